"""``bench.make_checkpoint``: named shapes carry a tokenizer covering their whole vocab, and the engine runs them."""

import json

import pytest

from bench.make_checkpoint import LLAMA_3_1_8B, SHAPES, CheckpointError, write_checkpoint
from common.engine.config import EngineConfig
from common.engine.demo_model import BOS, EOS, EOT, build_tokenizer
from common.engine.engine import LLMEngine
from common.engine.tokenizer import Tokenizer
from common.messages import SamplingParams

VOCAB = 1000
# the 8B shape's layout (GQA 4:1, llama3 rope scaling, untied head) at a size a test can run
TINY_8B = LLAMA_3_1_8B | {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SHAPES, "tiny-8b", TINY_8B)
        return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny-8b", seed=3)


def test_every_id_of_the_vocab_decodes_to_text(tiny):
    tok = Tokenizer.from_dir(tiny)
    config = json.loads((tiny / "config.json").read_text())
    assert config["vocab_size"] == tok.vocab_size == VOCAB
    assert config["rope_scaling"] == LLAMA_3_1_8B["rope_scaling"] and config["tie_word_embeddings"] is False
    special = {tok.backend.token_to_id(t) for t in (BOS, EOS, EOT)}
    assert config["bos_token_id"] in special and config["eos_token_id"] in special
    for token_id in range(VOCAB):
        assert tok.decode([token_id], skip_special_tokens=False), token_id
        if token_id not in special:
            assert tok.decode([token_id]), token_id
    assert tok.id_to_token(VOCAB) is None
    # the demo tokenizer's own ids and encoding are unchanged by the growth
    assert tok.encode("Hello, world!") == build_tokenizer().encode("Hello, world!").ids


def test_the_engine_runs_it_and_every_output_token_has_text(tiny):
    engine = LLMEngine(EngineConfig(model=str(tiny), dtype="float32", device="cpu", num_kv_blocks=32))
    tok = Tokenizer.from_dir(tiny)
    sampling = SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
    (out,) = engine.generate([tok.encode("The quick brown fox")], sampling)
    assert len(out.new_token_ids) == 24 and all(0 <= i < VOCAB for i in out.new_token_ids)
    assert out.text and out.text == tok.decode(out.new_token_ids)  # what the engine streams back


def test_a_vocab_below_the_tokenizers_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "too-small", TINY_8B | {"vocab_size": 100})
    with pytest.raises(ValueError, match="below the demo tokenizer's 336 ids"):
        write_checkpoint(tmp_path / "small", "too-small")
    with pytest.raises(CheckpointError, match="unknown shape"):
        write_checkpoint(tmp_path / "x", "no-such-shape")
