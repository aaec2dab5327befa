"""The fused Triton kernels (norm, rotary, SiLU*mul, sampling) against their PyTorch references,
and the references against the model's and the sampler's own math.

On a GPU the kernels run compiled (bf16 included); elsewhere they need ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, float32/float16 only), else the module is skipped.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from common.engine.kernels import activation, norm, paged_attention, rotary, sampling  # noqa: E402
from common.engine.model import RMSNorm, RotaryEmbedding, apply_rope  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # a few ulp


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# --- RMSNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 128, 4096])
def test_rms_norm_matches_reference(dtype, hidden):
    x, weight = randn(5, hidden, dtype=dtype, seed=1), randn(hidden, dtype=dtype, seed=2)
    assert_close(norm.rms_norm(x, weight, 1e-6), norm.rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_strided_heads(dtype):
    """The qk-norm case: ``[N, heads, head_dim]`` rows of a wider buffer."""
    buffer = randn(3, 6, 64, dtype=dtype, seed=3)
    heads, weight = buffer[:, 1:5], randn(64, dtype=dtype, seed=4)
    out = norm.rms_norm(heads, weight, 1e-5)
    assert out.shape == heads.shape
    assert_close(out, norm.rms_norm_reference(heads, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 128, 1000])
def test_fused_add_rms_norm_matches_reference(dtype, hidden):
    x, weight = randn(4, hidden, dtype=dtype, seed=5), randn(hidden, dtype=dtype, seed=6)
    residual = randn(4, hidden, dtype=dtype, seed=7)
    expected_residual = residual.clone()
    expected, _ = norm.fused_add_rms_norm_reference(x, expected_residual, weight, 1e-6)
    out, new_residual = norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert new_residual is residual
    assert torch.equal(residual, expected_residual)  # one rounding of the sum, as torch
    assert_close(out, expected)


def test_norm_references_are_the_model_math():
    layer = RMSNorm(64, 1e-6).to(DEVICE)
    layer.weight.data = randn(64, seed=8)
    x, attn_out = randn(3, 64, seed=9), randn(3, 64, seed=10)
    assert torch.equal(norm.rms_norm_reference(x, layer.weight, 1e-6), layer(x))
    out, residual = norm.fused_add_rms_norm_reference(attn_out, x.clone(), layer.weight, 1e-6)
    assert torch.equal(residual, x + attn_out) and torch.equal(out, layer(x + attn_out))


def test_rms_norm_rejects_a_mismatched_residual():
    with pytest.raises(ValueError):
        norm.fused_add_rms_norm(randn(2, 64), randn(2, 64, dtype=torch.float16), randn(64), 1e-6)


# --- rotary ----------------------------------------------------------------------------------


def rope_table(head_dim: int, dtype: torch.dtype, max_positions: int = 200) -> torch.Tensor:
    rope = RotaryEmbedding(head_dim, 10000.0, None, max_positions)
    rope.build_table(DEVICE, dtype)
    return rope.table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_rotary_matches_reference_on_views_of_qkv(dtype, head_dim, gqa):
    n, heads = 5, 8
    kv_heads = heads // gqa
    qkv = randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=gqa)
    q = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 1, 17, 100, 199], device=DEVICE)
    table = rope_table(head_dim, dtype)
    expected_q, expected_k = q.clone(), k.clone()
    rotary.apply_rotary_reference(expected_q, expected_k, positions, table)
    rotary.apply_rotary_(q, k, positions, table)
    # rounded where torch rounds (compiled without FMA contraction: ``rotary.NO_FP_FUSION``), every dtype
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)


def test_rotary_head_dim_not_a_power_of_two():
    q, k, table = randn(3, 3, 96, seed=11), randn(3, 1, 96, seed=12), rope_table(96, torch.float32)
    positions = torch.tensor([5, 0, 60], device=DEVICE)
    expected_q, expected_k = q.clone(), k.clone()
    rotary.apply_rotary_reference(expected_q, expected_k, positions, table)
    rotary.apply_rotary_(q, k, positions, table)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, gqa", [(64, 4), (128, 1), (96, 3)])
@pytest.mark.parametrize("padded", [False, True])
def test_rotary_write_kv_is_rotary_then_write_kv(dtype, head_dim, gqa, padded):
    """The fused kernel leaves q and the cache bit-identical to ``apply_rotary_`` then ``write_kv`` (and
    to the references), k untouched; ``padded``: CUDA-graph padding, rows 4 and 5 rewrite row 0's slot
    with row 0's K/V rotated at row 0's position (their own positions are junk)."""
    n, kv_heads, block_size = 6, 2, 8
    heads = kv_heads * gqa
    qkv = randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=head_dim + gqa)
    q = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(n, kv_heads, head_dim)
    positions = torch.tensor([7, 0, 17, 199, 3, 50], device=DEVICE)
    slots = torch.tensor([7, 40, 17, 31, 7, 7] if padded else [7, 40, 17, 31, 0, 63], device=DEVICE)
    source = torch.tensor([0, 1, 2, 3, 0, 0], device=DEVICE) if padded else None
    table = rope_table(head_dim, dtype)
    cache = randn(8, kv_heads, block_size, 2, 2, head_dim, dtype=dtype, seed=3)  # 2 layers: writes layer 1
    unfused_q, unfused_k, expected_q = q.clone(), k.clone(), q.clone()
    unfused_cache, expected_cache = cache.clone(), cache.clone()
    rotary.apply_rotary_(unfused_q, unfused_k, positions, table)
    paged_attention.write_kv(unfused_cache, 1, unfused_k, v, slots, source)
    rotary.apply_rotary_write_kv_reference(expected_q, k, v, positions, table, expected_cache, 1, slots, source)
    k_before = k.clone()
    rotary.apply_rotary_write_kv_(q, k, v, positions, table, cache, 1, slots, source)
    assert torch.equal(q, unfused_q) and torch.equal(cache, unfused_cache) and torch.equal(k, k_before)
    assert torch.equal(q, expected_q) and torch.equal(cache, expected_cache)


def test_rotary_write_kv_rejects_mismatched_slots():
    q, k, table = randn(3, 2, 64, seed=11), randn(3, 1, 64, seed=12), rope_table(64, torch.float32)
    cache = randn(4, 1, 8, 1, 2, 64, seed=13)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary.apply_rotary_write_kv_(q, k, k, torch.zeros(3, dtype=torch.long, device=DEVICE), table, cache, 0,
                                      torch.zeros(2, dtype=torch.long, device=DEVICE))  # fmt: skip


def test_rotary_reference_is_the_model_math():
    q, k, table = randn(4, 4, 64, seed=13), randn(4, 2, 64, seed=14), rope_table(64, torch.float32)
    positions = torch.tensor([3, 0, 150, 9], device=DEVICE)
    expected = apply_rope(torch.cat((q, k), dim=1), table[positions])
    rotary.apply_rotary_reference(q, k, positions, table)
    assert torch.equal(torch.cat((q, k), dim=1), expected)


# --- SiLU * mul ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 100, 1027])
def test_silu_and_mul_matches_reference(dtype, inter):
    wide = randn(3, 2 * inter + 8, dtype=dtype, seed=inter, scale=4.0)
    gate_up = wide[:, : 2 * inter]  # rows strided, as a view of a wider buffer
    assert_close(activation.silu_and_mul(gate_up, block=256), activation.silu_and_mul_reference(gate_up))


def test_silu_and_mul_single_row():
    gate_up = randn(1, 128, seed=15)
    assert_close(activation.silu_and_mul(gate_up), activation.silu_and_mul_reference(gate_up))


# --- sampling --------------------------------------------------------------------------------


def batch_params(rows: list[tuple[float, int, float, int, int]]) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k, top_p, seed, step) per row -> the five device tensors ``sample`` takes."""
    temps, ks, ps, seeds, steps = zip(*rows)
    return (
        torch.tensor(temps, dtype=torch.float32, device=DEVICE),
        torch.tensor(ks, dtype=torch.int32, device=DEVICE),
        torch.tensor(ps, dtype=torch.float32, device=DEVICE),
        torch.tensor(seeds, dtype=torch.int64, device=DEVICE),
        torch.tensor(steps, dtype=torch.int64, device=DEVICE),
    )


def both(logits: torch.Tensor, params: tuple[torch.Tensor, ...], filtering: bool = True) -> torch.Tensor:
    """The kernel's tokens (several vocabulary parts a row), checked equal to the reference's."""
    tokens = sampling.sample(logits, *params, filtering=filtering, block=128, span=256)
    assert torch.equal(tokens, sampling.sample_reference(logits, *params, filtering=filtering))
    return tokens


def test_greedy_is_argmax_with_ties_to_the_lowest_index():
    logits = torch.randint(0, 4, (6, 700), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    logits[1, 650:] = 9.0  # the max tied across vocabulary parts
    logits[2] = float("-inf")
    params = batch_params([(0.0, 0, 1.0, 1, 0)] * 6)
    assert torch.equal(both(logits, params), logits.argmax(dim=-1))
    assert both(logits, params)[1] == 650 and both(logits, params)[2] == 0


def test_argmax_is_torch_argmax():
    """Split over vocabulary parts, token-identical to ``torch.argmax``: random rows, a max tied across parts,
    an all ``-inf`` row, NaNs (the first one wins, in a later part than a larger number too), an ``inf``."""
    logits = randn(8, 700, seed=21, scale=4.0)
    logits[1, [100, 650]] = 50.0
    logits[2] = float("-inf")
    logits[3, [30, 600]] = float("nan")
    logits[4, 5], logits[4, 400] = 1e30, float("nan")
    logits[5, [3, 299]] = float("inf")
    logits[6] = torch.randint(0, 3, (700,), generator=torch.Generator().manual_seed(22)).float().to(DEVICE)
    for block, span in [(128, 256), (64, 700), (1024, 4096)]:
        assert torch.equal(sampling.argmax(logits, block=block, span=span), logits.argmax(dim=-1))
    assert sampling.argmax(logits[:, :1]).tolist() == [0] * 8
    vocab = randn(2, 128256, seed=23)  # Llama 3's vocabulary, the default parts: 32 a row
    vocab[1, [70000, 128255]] = 9.0
    assert torch.equal(sampling.argmax(vocab), vocab.argmax(dim=-1))


def test_top_k_1_is_greedy_in_a_mixed_batch():
    logits = randn(4, 500, seed=16, scale=3.0)
    params = batch_params([(1.5, 1, 1.0, 1, 0), (1.0, 0, 1.0, 2, 0), (0.0, 0, 1.0, 3, 0), (0.7, 1, 0.5, 4, 0)])
    tokens, argmax = both(logits, params), logits.argmax(dim=-1)
    assert tokens[[0, 2, 3]].tolist() == argmax[[0, 2, 3]].tolist()


@pytest.mark.parametrize("filtering", [True, False])
def test_kernel_draws_the_reference_tokens(filtering):
    logits = randn(8, 1000, seed=17, scale=2.0)
    rows = [(1.0, 0, 1.0, 0, 0), (0.7, 40, 1.0, 1, 3), (1.3, 0, 0.9, 2**40, 7), (0.0, 0, 1.0, -5, 1),
            (1.0, 5, 0.5, 7, 2), (2.0, 1000, 1.0, 9, 9), (1.0, 0, 0.2, 11, 0), (0.5, 3, 0.99, 13, 4)]  # fmt: skip
    both(logits, batch_params(rows), filtering)
    uniform = torch.zeros(8, 1000, device=DEVICE)  # the draw is the noise's argmax: checks the hash itself
    both(uniform, batch_params(rows), filtering)


def test_seeded_draws_are_reproducible_and_batch_independent():
    target = randn(1, 300, seed=18)

    def draw(batch: int, row: int, step: int) -> int:
        logits = randn(batch, 300, seed=100 + batch)
        logits[row] = target[0]
        rows = [(1.0, 0, 1.0, 1000 + i, step) for i in range(batch)]
        rows[row] = (1.0, 0, 1.0, 42, step)
        return int(both(logits, batch_params(rows))[row])

    draws = [draw(1, 0, step) for step in range(12)]
    assert draws == [draw(3, 2, step) for step in range(12)]
    assert len(set(draws)) > 1  # the step moves the stream


def test_row_keys_use_every_bit_of_seed_and_step():
    seeds = torch.tensor([0, 1, 2**32, -1, 2**32 - 1, 0], device=DEVICE)
    steps = torch.tensor([0, 0, 0, 0, 0, 1], device=DEVICE)
    keys = sampling.row_keys(seeds, steps)
    assert len(set(keys.tolist())) == 6 and int(keys.min()) >= 0 and int(keys.max()) < 2**32


def test_filter_thresholds_keep_the_samplers_sets():
    scaled = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 5, device=DEVICE))
    ks = torch.tensor([0, 2, 0, 0, 3], device=DEVICE)
    ps = torch.tensor([1.0, 1.0, 0.5, 0.35, 0.75], device=DEVICE)
    kept = scaled >= sampling.filter_thresholds(scaled, ks, ps)[:, None]
    # row 4: the top 3 renormalized (0.2, 0.3, 0.4)/0.9: mass before 0.2 is 0.78 >= 0.75
    assert kept.tolist() == [[True] * 4, [False, False, True, True], [False, False, True, True],
                             [False, False, False, True], [False, False, True, True]]  # fmt: skip


FOUR_TOKENS = torch.tensor([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "expected"),
    [(1.0, 0, 1.0, [0.1, 0.2, 0.3, 0.4]), (2.0, 0, 1.0, None), (1.0, 2, 1.0, [0, 0, 3 / 7, 4 / 7]),
     (1.0, 0, 0.35, [0, 0, 0, 1.0])],
)  # fmt: skip
def test_draw_frequencies_follow_the_distribution(temperature, top_k, top_p, expected):
    """2000 draws (seeds 0..1999) within 4 standard deviations of each probability: the kernel's on a
    GPU, the reference's in the interpreter (too slow there; the next test ties the two together)."""
    if expected is None:  # temperature T: probabilities proportional to p ** (1 / T)
        expected = (FOUR_TOKENS ** (1 / temperature) / (FOUR_TOKENS ** (1 / temperature)).sum()).tolist()
    draws = 2000
    logits = FOUR_TOKENS.log().to(DEVICE).expand(draws, 4).contiguous()
    params = batch_params([(temperature, top_k, top_p, seed, 0) for seed in range(draws)])
    sample = sampling.sample if DEVICE.type == "cuda" else sampling.sample_reference
    freq = torch.bincount(sample(logits, *params).cpu(), minlength=4).double() / draws
    for f, p in zip(freq.tolist(), expected):
        assert abs(f - p) <= 4 * math.sqrt(p * (1 - p) / draws) + 1e-9, (freq.tolist(), expected)


def test_kernel_draws_the_reference_tokens_of_the_four_token_distribution():
    configs = [(1.0, 0, 1.0), (2.0, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.35)]
    rows = [(*configs[i % 4], i // 4, 0) for i in range(160)]
    both(FOUR_TOKENS.log().to(DEVICE).expand(len(rows), 4).contiguous(), batch_params(rows))
