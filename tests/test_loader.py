"""Demo checkpoint, tokenizer, chat template, model resolution and the loader's errors."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config import ConfigError
from common.engine.attention import AttentionMetadata
from common.engine.demo_model import DEMO_VERSION, EOS, EOT, ensure_demo_checkpoint
from common.engine.kv_cache import KVCache
from common.engine.loader import load_model, parse_dtype, resolve_model_path
from common.engine.model_config import SUPPORTED_ARCHITECTURES, ModelLoadError, load_model_config
from common.engine.tokenizer import Tokenizer

TEXTS = ["héllo 世界 🙂", "Hello, world! The quick brown fox.", "  two  spaces\nand\ttabs ", "", "<|eot|> inline"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def demo_copy(demo, tmp_path):
    return shutil.copytree(demo, tmp_path / "model")


def test_demo_checkpoint_is_deterministic(demo, tmp_path):
    other = ensure_demo_checkpoint(tmp_path)
    assert other.name == demo.name == f"demo-llama-v{DEMO_VERSION}"
    names = sorted(p.name for p in demo.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]  # fmt: skip
    for name in names:
        assert (demo / name).read_bytes() == (other / name).read_bytes(), name


def test_demo_checkpoint_is_reused_and_concurrent_writers_agree(tmp_path):
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_demo_checkpoint(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(paths) == 3
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temp dirs left behind
    mtime = (paths[0] / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint(tmp_path) == paths[0]
    assert (paths[0] / "model.safetensors").stat().st_mtime_ns == mtime


def test_demo_resolves_from_cache_dir_env(tmp_path, monkeypatch, demo):
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    shutil.copytree(demo, tmp_path / demo.name)
    assert resolve_model_path("demo") == tmp_path / demo.name
    assert resolve_model_path(str(demo)) == demo


def test_demo_loads_and_runs(demo):
    config = load_model_config(demo)
    tok = Tokenizer.from_dir(demo)
    assert config.architecture == "LlamaForCausalLM" and config.vocab_size == tok.vocab_size
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (4, 8, 4, 32)
    assert config.max_model_len == 4096 and config.torch_dtype == "bfloat16"
    eos_ids = (tok.backend.token_to_id(EOS), tok.backend.token_to_id(EOT))
    assert config.eos_token_ids == eos_ids and tok.eos_token_ids == eos_ids
    assert config.bos_token_id == tok.bos_token_id == tok.encode("x")[0]
    model = load_model(demo, config, torch.float32, "cpu")
    cache = KVCache(4, config.num_layers, 16, config.num_kv_heads, config.head_dim, torch.float32, "cpu")
    ids = tok.encode("Hello, world!")
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[2]], 16, "cpu")
    logits = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), meta, cache))
    assert logits.shape == (len(ids), config.vocab_size) and torch.isfinite(logits).all()
    assert cache.block_view(2).abs().sum() > 0 and cache.block_view(0).abs().sum() == 0


def test_tokenizer_round_trips_and_matches_transformers(demo):
    from transformers import AutoTokenizer

    tok, hf = Tokenizer.from_dir(demo), AutoTokenizer.from_pretrained(demo)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == text.replace(EOT, "")
        assert ids == hf.encode(text, add_special_tokens=False)
        with_bos = tok.encode(text)
        assert with_bos == hf.encode(text) and with_bos[0] == tok.bos_token_id
        assert tok.decode(with_bos) == hf.decode(with_bos, skip_special_tokens=True)
        assert tok.decode(with_bos, skip_special_tokens=False) == hf.decode(with_bos)
    emoji = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji) == 4  # one token per UTF-8 byte: the detokenizer must hold partial characters
    assert tok.convert_ids_to_tokens(tok.encode("Hello", add_special_tokens=False)) == hf.tokenize("Hello")
    assert tok.id_to_token(tok.vocab_size) is None


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "héllo 🙂"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "And?"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(demo, add_generation_prompt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo)
    ours = Tokenizer.from_dir(demo).apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.startswith("<|begin_of_text|><|system|>\nBe brief.<|eot|>\n")
    assert ours.endswith("<|assistant|>\n") == add_generation_prompt


def test_chat_template_sources_and_errors(demo_copy):
    config_file = demo_copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    strict = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
              "{{ raise_exception('bad role ' + m['role']) }}{% endif %}{{ m | tojson }}{% endfor %}")  # fmt: skip
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": strict}]
    config_file.write_text(json.dumps(config))
    tok = Tokenizer.from_dir(demo_copy)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}'
    with pytest.raises(ValueError, match="bad role system"):
        tok.apply_chat_template(MESSAGES)
    with pytest.raises(ValueError, match="list of objects"):
        tok.apply_chat_template(["hi"])  # type: ignore[list-item]

    (demo_copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # takes precedence
    assert Tokenizer.from_dir(demo_copy).apply_chat_template([{"role": "user", "content": "a"}]) == "a!"

    (demo_copy / "chat_template.jinja").unlink()
    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(demo_copy).apply_chat_template(MESSAGES)


def test_parse_dtype(demo):
    config = load_model_config(demo)
    assert parse_dtype("auto", config, "cpu") is torch.float32
    assert parse_dtype("auto", config, "cuda") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="--dtype: 'fp8'"):
        parse_dtype("fp8")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture(demo_copy):
    _edit_config(demo_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel' is not supported") as e:
        load_model_config(demo_copy)
    assert all(name in str(e.value) for name in SUPPORTED_ARCHITECTURES)


def test_unsupported_rope_type(demo_copy):
    _edit_config(demo_copy, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="rope_type 'yarn' is not supported"):
        load_model_config(demo_copy)


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_config(tmp_path)


def test_missing_tensor_is_named(demo_copy):
    weights = load_file(demo_copy / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, demo_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing from the checkpoint: model\.layers\.2\.mlp\.up_proj\.weight$"):
        load_model(demo_copy, load_model_config(demo_copy), torch.float32, "cpu")


def test_wrong_shape_is_named(demo_copy):
    weights = load_file(demo_copy / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    save_file(weights, demo_copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight \[128\] \(expected \[256\]\)"):
        load_model(demo_copy, load_model_config(demo_copy), torch.float32, "cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(demo_copy, damage):
    file = demo_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt or unreadable"):
        load_model(demo_copy, load_model_config(demo_copy), torch.float32, "cpu")


def test_missing_shard_is_named(demo_copy):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (demo_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="shard files missing: model-00002-of-00002.safetensors"):
        load_model(demo_copy, load_model_config(demo_copy), torch.float32, "cpu")


def test_missing_tokenizer(demo_copy):
    (demo_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_dir(demo_copy)


def test_hub_model_id_fails_fast():
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="'no-such-org/no-such-model'.*local model directory or 'demo'"):
        resolve_model_path("no-such-org/no-such-model", hub_timeout_s=5.0)
    assert time.monotonic() - start < 10


def test_hub_that_never_answers_is_abandoned(monkeypatch):
    import huggingface_hub

    released = threading.Event()
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: released.wait(30))  # a hung network
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="no answer from the Hugging Face Hub within 0.5s"):
        resolve_model_path("org/model", hub_timeout_s=0.5)
    assert time.monotonic() - start < 5
    released.set()


def test_invalid_hub_id():
    with pytest.raises(ModelLoadError, match="neither a local directory nor a hub id"):
        resolve_model_path("bad id//x")


def test_path_that_is_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_model_path(str(tmp_path / "absent"))
