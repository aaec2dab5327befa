"""The engine on the Triton backend (paged attention in place, fused norm/rotary/SiLU*mul) gives the greedy
tokens of the PyTorch backend: batches, prefix-cache hits, chunked prefill, batches mixing prefill and
decode rows, padded decode-graph batches, and the checkpoint families of ``tests/checkpoints.py`` (Qwen3's
q/k norms, Mistral's sliding window).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``),
float32, tiny models and few tokens; the module is skipped without triton, or without CUDA and the
interpreter.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("triton")

from common.config import ConfigError  # noqa: E402
from common.engine import attention  # noqa: E402
from common.engine.config import EngineConfig  # noqa: E402
from common.engine.engine import LLMEngine  # noqa: E402
from common.engine.kernels import decode_attention, gemv, rotary  # noqa: E402
from common.engine.kernels.backend import resolve_attention_backend, resolve_decode_gemv  # noqa: E402
from common.engine.loader import resolve_model_path  # noqa: E402
from common.messages import SamplingParams  # noqa: E402
from tests.checkpoints import make_hf_checkpoint  # noqa: E402
from tests.test_cuda_graph import RerunGraphs  # noqa: E402
from tests.test_engine import engine as cached_engine  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

def engine(model, backend: str, **overrides) -> LLMEngine:
    """An idle float32 engine on ``backend`` (cached per config, as test_engine's)."""
    return cached_engine(model, attention_backend=backend, device=DEVICE, num_kv_blocks=64, **overrides)


def prompts(lengths, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 330) for _ in range(n)] for n in lengths]


def tokens(outputs) -> list[list[int]]:
    return [o.new_token_ids for o in outputs]


def both(model, ps, **overrides) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens of ``ps`` batched on the torch and on the triton backend (prefix caching off)."""
    overrides = {"enable_prefix_caching": False, **overrides}
    return tuple(tokens(engine(model, b, **overrides).generate(ps, GREEDY)) for b in ("torch", "triton"))


@pytest.fixture(scope="module")
def demo_path():
    return resolve_model_path("demo")


@pytest.fixture
def query_lens_seen(monkeypatch) -> list[list[int]]:
    """Per ``prefill_attention`` call of the triton path: its sequences' query lengths."""
    seen: list[list[int]] = []
    prefill = attention.kernels.prefill_attention

    def spy(q, kv_data, layer, block_tables, query_start_loc, *args, **kwargs):
        if layer == 0:
            seen.append(query_start_loc.diff().tolist())
        return prefill(q, kv_data, layer, block_tables, query_start_loc, *args, **kwargs)

    monkeypatch.setattr(attention.kernels, "prefill_attention", spy)
    return seen


@pytest.fixture
def attention_calls(monkeypatch) -> list[tuple[str, int]]:
    """Per attention kernel call of the triton path on layer 0: (kernel, rows of q): ``fused``
    (``rotary_decode_attention``), ``rotary_write`` (``apply_rotary_write_kv_``), ``decode`` (the unfused
    ``decode_attention``)."""
    calls: list[tuple[str, int]] = []

    def spy(module, attr: str, name: str, layer_arg: int) -> None:
        kernel = getattr(module, attr)

        def record(*args, **kwargs):
            if args[layer_arg] == 0:
                calls.append((name, args[0].shape[0]))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(module, attr, record)

    spy(decode_attention, "rotary_decode_attention", "fused", 6)
    spy(rotary, "apply_rotary_write_kv_", "rotary_write", 6)
    spy(decode_attention, "decode_attention", "decode", 2)
    return calls


def test_backend_resolution(monkeypatch):
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_attention_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as on a CPU host here; a GPU host runs the kernels compiled
    assert resolve_attention_backend("triton", torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="attention-backend.*TRITON_INTERPRET"):
        resolve_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ConfigError, match="attention-backend"):
        EngineConfig(attention_backend="flash").validate()


@pytest.mark.parametrize("block_size", [16, 8])
def test_batch_matches_torch_backend(demo_path, block_size, attention_calls):
    """Its decode steps run the fused decode kernel (rotary, K/V write and attention), the prefill the others."""
    torch_tokens, triton_tokens = both(demo_path, prompts((3, 17, 40)), block_size=block_size)
    assert triton_tokens == torch_tokens
    if DEVICE == "cpu":  # eager decode steps: every call is seen
        assert attention_calls == [("rotary_write", 60)] + [("fused", 3)] * (GREEDY.max_tokens - 1)
    else:  # the warm-up captured decode graphs, which the steps replay without calling into Python
        assert "decode" not in {name for name, _ in attention_calls}
    assert engine(demo_path, "triton", block_size=block_size, enable_prefix_caching=False).model.attention_backend \
        == "triton"  # fmt: skip


def test_prefix_cache_hit_matches_torch_backend(demo_path):
    shared = prompts((34,), seed=1)[0]
    ps = [shared + tail for tail in prompts((1, 9), seed=2)]
    reference = tokens(engine(demo_path, "torch", enable_prefix_caching=False).generate(ps, GREEDY))
    eng = engine(demo_path, "triton")
    first = eng.generate(ps[:1], GREEDY)[0]
    second = eng.generate(ps[1:], GREEDY)[0]
    assert [first.new_token_ids, second.new_token_ids] == reference
    assert second.usage.cached_tokens == 32


def test_chunked_prefill_mixed_with_decode_matches_torch_backend(demo_path, query_lens_seen):
    """A request decoding while another's prompt is prefilled in chunks of the step budget: the mixed steps
    attend in one ``prefill_attention`` call."""
    ps = prompts((5, 30), seed=3)
    outputs = {}
    for backend in ("torch", "triton"):
        eng = engine(demo_path, backend, max_num_batched_tokens=8, enable_prefix_caching=False)
        generated: dict[str, list[int]] = {"a": [], "b": []}

        def step() -> None:
            for out in eng.step():
                generated[out.request_id] += out.new_token_ids

        eng.add_request("a", ps[0], GREEDY)
        while not generated["a"]:  # a: prefill (its token comes a step later under async scheduling), then decodes
            step()
        eng.add_request("b", ps[1], GREEDY)
        while eng.has_unfinished():
            step()
        outputs[backend] = generated
    assert outputs["triton"] == outputs["torch"]
    assert [len(t) for t in outputs["triton"].values()] == [GREEDY.max_tokens] * 2
    assert any(1 in lens and max(lens) > 1 for lens in query_lens_seen), query_lens_seen


@pytest.fixture
def batch_gemvs(monkeypatch):
    """GEMV tiles of 64 outputs (the interpreter runs programs one by one), used by steps of up to the kernel's
    8 rows (the model's own cutoff is 1: these tests cover batches)."""
    monkeypatch.setattr(gemv, "BLOCK_N", 64)
    monkeypatch.setattr(gemv, "DECODE_MAX_ROWS", gemv.MAX_ROWS)


@pytest.mark.parametrize("decode_gemv", ["torch", "triton"])
def test_padded_decode_graph_batch_matches_torch_backend(demo_path, decode_gemv, batch_gemvs, attention_calls):
    """The decode graphs' forward (fixed buffers, padded rows rewriting row 0's K/V) on the triton path, its
    projections on cuBLAS or the decode GEMVs, its attention the fused decode kernel over the padded batch."""
    ps = prompts((5, 20, 17), seed=4)
    expected = tokens(engine(demo_path, "torch", enable_prefix_caching=False, max_num_seqs=8).generate(ps, GREEDY))
    config = EngineConfig(model=str(demo_path), dtype="float32", device=DEVICE, num_kv_blocks=64,
                          enable_prefix_caching=False, max_num_seqs=8, attention_backend="triton",
                          decode_gemv=decode_gemv)  # fmt: skip
    graphed = LLMEngine(config)
    runner = graphed.runner
    runner.graphs = RerunGraphs(runner.model, runner.kv_cache, 8, graphed.max_model_len)
    attention_calls.clear()  # on CUDA the engine's warm-up ran the kernels
    assert tokens(graphed.generate(ps, GREEDY)) == expected
    assert runner.graphs.captured and runner.graphs.replays == GREEDY.max_tokens - 1
    # each capture runs the forward (on CUDA twice: warm-up, then recording) and each replay reruns it on CPU;
    # a CUDA replay calls no Python
    captures = len(runner.graphs.captured)
    forwards = captures + runner.graphs.replays if DEVICE == "cpu" else 2 * captures
    assert attention_calls == [("rotary_write", 42)] + [("fused", 4)] * forwards


@pytest.mark.parametrize("family", ["qwen3", "mistral", "llama", "qwen2"])
def test_families_match_torch_backend(family, demo_path, tmp_path):
    """Qwen3: q/k norms before the in-place rotary; Mistral: sliding window 12 < the prompt lengths, GQA 4;
    Llama: llama3 rope scaling; Qwen2: q/k/v biases."""
    make_hf_checkpoint(tmp_path, family, demo_path)
    torch_tokens, triton_tokens = both(tmp_path, prompts((6, 21)))
    assert triton_tokens == torch_tokens


def test_decode_gemv_resolution():
    assert not resolve_decode_gemv("auto", "triton", torch.device("cpu"))
    assert resolve_decode_gemv("auto", "triton", torch.device("cuda"))
    assert not resolve_decode_gemv("auto", "torch", torch.device("cuda"))
    assert resolve_decode_gemv("triton", "triton", torch.device("cpu"))
    assert not resolve_decode_gemv("torch", "triton", torch.device("cuda"))
    with pytest.raises(ConfigError, match="decode-gemv"):
        resolve_decode_gemv("triton", "torch", torch.device("cuda"))
    with pytest.raises(ConfigError, match="decode-gemv"):
        EngineConfig(decode_gemv="cublas").validate()


def test_decode_gemvs_match_torch_backend(demo_path, monkeypatch, batch_gemvs):
    """Steps of at most ``gemv.DECODE_MAX_ROWS`` rows (the kernel's 8 here: the decodes, a short prompt) run the
    GEMVs, longer prefills cuBLAS; the greedy tokens are the torch backend's."""
    rows_seen: list[int] = []
    norm_gemv = gemv.norm_gemv

    def spy(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return norm_gemv(x, *args, **kwargs)

    monkeypatch.setattr(gemv, "norm_gemv", spy)
    ps = prompts((3, 17, 40), seed=5)
    expected = tokens(engine(demo_path, "torch", enable_prefix_caching=False).generate(ps, GREEDY))
    eng = engine(demo_path, "triton", enable_prefix_caching=False, decode_gemv="triton")
    assert eng.model.decode_gemv
    assert tokens(eng.generate(ps, GREEDY)) == expected
    # three decodes: eager on CPU; on CUDA the decode graph of their bucket (4 rows), captured by the warm-up
    assert rows_seen and max(rows_seen) <= gemv.MAX_ROWS and (3 if DEVICE == "cpu" else 4) in rows_seen


def test_decode_gemvs_with_biases_match_torch_backend(demo_path, tmp_path, batch_gemvs):
    """Qwen2's q/k/v biases through the fused norm + qkv GEMV."""
    make_hf_checkpoint(tmp_path, "qwen2", demo_path)
    ps = prompts((6, 21))
    expected = tokens(engine(tmp_path, "torch", enable_prefix_caching=False).generate(ps, GREEDY))
    eng = engine(tmp_path, "triton", enable_prefix_caching=False, decode_gemv="triton")
    assert eng.model.model.layers[0].self_attn.qkv_proj.bias is not None and eng.model.decode_gemv
    assert tokens(eng.generate(ps, GREEDY)) == expected


def test_every_kernel_gets_16_byte_aligned_tensors_whatever_the_batch(demo_path, monkeypatch):
    """Triton compiles a kernel variant per alignment class (16 bytes) of each pointer argument: the engine's
    step metadata (context lengths, slots, block tables, positions: views of one copied buffer) must start
    aligned for every batch -- 1 to 4 prompts of odd and even lengths, chunked, decoding -- or a batch the
    warm-up did not run compiles a variant mid-serving."""
    misaligned: list[tuple[str, int, tuple[int, ...]]] = []

    def spy(module, name: str) -> None:
        kernel = getattr(module, name)

        def checked(*args, **kwargs):
            for i, arg in enumerate([*args, *kwargs.values()]):
                if isinstance(arg, torch.Tensor) and arg.data_ptr() % 16:
                    misaligned.append((name, i, tuple(arg.shape)))
            return kernel(*args, **kwargs)

        monkeypatch.setattr(module, name, checked)

    for module, name in ((attention.kernels, "prefill_attention"), (attention.kernels, "write_kv"),
                         (rotary, "apply_rotary_write_kv_"), (decode_attention, "rotary_decode_attention"),
                         (decode_attention, "decode_attention")):  # fmt: skip
        spy(module, name)
    eng = engine(demo_path, "triton", enable_prefix_caching=False, max_num_batched_tokens=48)
    for lengths in ((5,), (20, 17), (5, 20, 17), (33, 6, 9, 40)):
        assert all(len(o.new_token_ids) == GREEDY.max_tokens for o in eng.generate(prompts(lengths), GREEDY))
    assert not misaligned, misaligned
