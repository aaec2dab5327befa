"""Tensor parallelism on CPU (gloo, real rank processes): TP > 1 engines generate what TP 1 generates."""

from __future__ import annotations

import random

import pytest
import torch

from common.config import ConfigError
from common.engine.config import EngineConfig
from common.engine.demo_model import ensure_demo_checkpoint
from common.engine.engine import LLMEngine
from common.engine.loader import load_model
from common.engine.model_config import load_model_config
from common.engine.model_runner import StepInputs
from common.engine.parallel import TensorParallel
from common.engine_service.config import EngineServiceConfig
from common.messages import SamplingParams
from services.cli import build_parser
from tests.checkpoints import FAMILIES, make_hf_checkpoint

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """name -> (checkpoint dir, the transformers model it holds): every family, and ``llama-bias-tied``
    (biases on every projection, including the row-parallel o_proj/down_proj, tied embeddings, and an
    odd vocabulary: the last rank holds fewer rows)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = path, make_hf_checkpoint(path, family, tokenizer_dir)
    path = tmp_path_factory.mktemp("llama-bias-tied")
    out["llama-bias-tied"] = path, make_hf_checkpoint(
        path, "llama", tokenizer_dir, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, vocab_size=335
    )
    return out


def prompts(lengths=(3, 17, 30), seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in lengths]


def generate(path, tp: int, ps: list[list[int]], **overrides) -> list[list[int]]:
    config = EngineConfig(model=str(path), dtype="float32", device="cpu", num_kv_blocks=32, block_size=4,
                          tensor_parallel_size=tp, **overrides)  # fmt: skip
    engine = LLMEngine(config)
    try:
        return [out.new_token_ids for out in engine.generate(ps, GREEDY)]
    finally:
        engine.close()


# mistral's single KV head is replicated on both ranks
@pytest.mark.parametrize("family", [*sorted(FAMILIES), "llama-bias-tied"])
def test_tp2_greedy_matches_tp1(checkpoints, family):
    path, _ = checkpoints[family]
    ps = prompts()
    assert generate(path, 2, ps) == generate(path, 1, ps)


def test_tp2_with_the_decode_gemvs_matches_tp1(checkpoints):
    """Each rank's one-row decode steps through the GEMVs (its slice of q/k/v and gate/up with the fused norms,
    o and down before the all-reduce, their biases after it): the greedy tokens of TP 1 on the torch backend."""
    path, _ = checkpoints["llama-bias-tied"]
    ps = prompts((17,), seed=3)  # one sequence: every decode step has one row
    assert generate(path, 2, ps, attention_backend="triton", decode_gemv="triton") == generate(path, 1, ps)


def test_tp2_matches_transformers(checkpoints):
    path, reference = checkpoints["llama"]
    ps = prompts(seed=1)
    expected = []
    for p in ps:
        ids = torch.tensor([p])
        gen = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        expected.append(gen[0, len(p) :].tolist())
    assert generate(path, 2, ps) == expected


def test_tp4_with_kv_heads_replicated_matches_tp1(checkpoints):
    """4 ranks, 2 KV heads: each KV head lives on two ranks; chunked prefill mixes with decodes."""
    path, _ = checkpoints["qwen3"]
    ps = prompts((5, 26, 41), seed=2)
    assert generate(path, 4, ps, max_num_batched_tokens=16) == generate(path, 1, ps, max_num_batched_tokens=16)


def test_each_rank_reads_only_its_slice(checkpoints, monkeypatch):
    """Rank 1 of 2: parameters have the shard's shape, every sharded tensor is read by a sliced read
    of exactly that shape (never ``get_tensor``), and the values are the checkpoint's rows/columns."""
    from common.engine import loader

    path, reference = checkpoints["llama-bias-tied"]
    config = load_model_config(path)
    whole_reads, sliced_reads = [], {}

    class RecordingSlice:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            tensor = self.inner[index]
            sliced_reads[self.name] = tuple(tensor.shape)
            return tensor

    class RecordingFile:
        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_slice(self, name):
            return RecordingSlice(name, self.file.get_slice(name))

        def get_tensor(self, name):
            whole_reads.append(name)
            return self.file.get_tensor(name)

    real_open = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda *a, **kw: RecordingFile(real_open(*a, **kw)))
    rank1 = TensorParallel(rank=1, world_size=2)
    model = load_model(path, config, torch.float32, "cpu", rank1)

    hd, hidden = config.head_dim, config.hidden_size
    q_rows, kv_rows, inter = 2 * hd, 1 * hd, config.intermediate_size // 2
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert attn.qkv_proj.weight.shape == (q_rows + 2 * kv_rows, hidden)
    assert attn.qkv_proj.bias.shape == (q_rows + 2 * kv_rows,)
    assert attn.o_proj.weight.shape == (hidden, q_rows) and attn.o_proj.bias.shape == (hidden,)
    vocab_start, vocab_rows = 168, config.vocab_size - 168  # ceil(335 / 2) rows each, the last rank the rest
    assert model.model.embed_tokens.weight.shape == (vocab_rows, hidden)
    assert mlp.gate_up_proj.weight.shape == (2 * inter, hidden) and mlp.down_proj.weight.shape == (hidden, inter)

    shards = model.weight_shards()
    assert shards and not set(shards) & set(whole_reads)
    prefix = "model.layers.0."
    assert sliced_reads[prefix + "self_attn.q_proj.weight"] == (q_rows, hidden)
    assert sliced_reads[prefix + "self_attn.k_proj.bias"] == (kv_rows,)
    assert sliced_reads[prefix + "self_attn.o_proj.weight"] == (hidden, q_rows)
    assert sliced_reads[prefix + "mlp.down_proj.weight"] == (hidden, inter)
    assert sliced_reads[prefix + "mlp.up_proj.bias"] == (inter,)
    assert sliced_reads["model.embed_tokens.weight"] == (vocab_rows, hidden)
    # the biases of row-parallel linears are whole on every rank, added once after the all-reduce
    assert {prefix + "self_attn.o_proj.bias", prefix + "mlp.down_proj.bias"} <= set(whole_reads)

    full = dict(reference.named_parameters())
    assert torch.equal(attn.qkv_proj.weight[:q_rows], full[prefix + "self_attn.q_proj.weight"][q_rows:])
    k_rows = attn.qkv_proj.weight[q_rows : q_rows + kv_rows]
    assert torch.equal(k_rows, full[prefix + "self_attn.k_proj.weight"][kv_rows:])
    assert torch.equal(mlp.down_proj.weight, full[prefix + "mlp.down_proj.weight"][:, inter:])
    assert torch.equal(model.model.embed_tokens.weight, full["model.embed_tokens.weight"][vocab_start:])


def test_kv_cache_holds_only_the_ranks_heads():
    config = dict(model="demo", dtype="float32", device="cpu", kv_cache_memory="4MiB", max_num_seqs=4)
    single, double = LLMEngine(EngineConfig(**config)), LLMEngine(EngineConfig(**config, tensor_parallel_size=2))
    try:
        heads = single.model_config.num_kv_heads
        assert (single.kv_cache.num_kv_heads, double.kv_cache.num_kv_heads) == (heads, heads // 2)
        assert double.kv_cache.block_bytes * 2 == single.kv_cache.block_bytes
        assert double.kv_cache.num_blocks == 2 * single.kv_cache.num_blocks  # the same memory budget per rank
    finally:
        double.close()


def test_vocab_rows_split_unevenly():
    assert [TensorParallel(rank, 3).vocab_rows(10) for rank in range(3)] == [(0, 4), (4, 4), (8, 2)]


def test_step_inputs_round_trip():
    inputs = StepInputs([5, 6, 7, 9], [0, 1, 2, 40], [3, 1], [3, 41], [[4], [7, 1, 0]], [False, True])
    assert StepInputs.unpack(inputs.pack()) == inputs


def test_tp_size_must_divide_the_heads(checkpoints):
    path, _ = checkpoints["llama"]
    with pytest.raises(ConfigError, match="3 does not divide the model's num_attention_heads 4"):
        LLMEngine(EngineConfig(model=str(path), device="cpu", tensor_parallel_size=3))
    with pytest.raises(ConfigError, match="tensor-parallel-size: must be >= 1"):
        EngineConfig(tensor_parallel_size=0).validate()


def test_every_role_takes_tp_and_the_cli_alias():
    for command in ("prefill", "decode"):
        ns = build_parser(command).parse_args([command, "-tp", "2"])
        assert ns.tensor_parallel_size == 2
    for role in ("both", "prefill", "decode"):
        EngineServiceConfig(role=role, tensor_parallel_size=2).validate()
