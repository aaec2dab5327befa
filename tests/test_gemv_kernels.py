"""The decode GEMV kernels (``common.engine.kernels.gemv``) against ``F.linear`` and their fused references:
K not a multiple of the block, few and many outputs, 1..8 rows, with and without bias, split-K, the
RMSNorm/residual prologue and the SiLU*mul epilogue; the one-row persistent kernel (``row_gemv``) the same
ways, its programs walking several output blocks (uneven counts).

On a GPU the kernels run compiled (bf16 included); elsewhere in Triton's interpreter (float32/float16,
small shapes), else the module is skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from common.engine.kernels import gemv, row_gemv  # noqa: E402
from common.engine.kernels.gemv import GemvConfig  # noqa: E402
from common.engine.kernels.row_gemv import RowConfig  # noqa: E402
from tests.test_fused_kernels import DTYPES, assert_close, randn  # noqa: E402

SHAPES = [(40, 100), (300, 64), (24, 1000)]  # (N, K): K off the block, N over several programs, a long K
TILE = GemvConfig(block_n=16, block_k=64)  # fewer programs than the default's (the interpreter runs each)
SPLIT = GemvConfig(block_n=8, block_k=64, split_k=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", range(1, gemv.MAX_ROWS + 1))
def test_gemv_matches_linear(dtype, rows):
    for i, (n, k) in enumerate(SHAPES):
        x, weight = randn(rows, k, dtype=dtype, seed=i), randn(n, k, dtype=dtype, seed=10 + i, scale=k**-0.5)
        bias = randn(n, dtype=dtype, seed=20 + i) if i % 2 else None
        assert_close(gemv.gemv(x, weight, bias, TILE), F.linear(x, weight, bias))


@pytest.mark.parametrize("rows", [1, 8])
def test_default_tile_matches_linear(rows):
    x, weight = randn(rows, 100, seed=1), randn(40, 100, seed=2, scale=0.1)
    assert_close(gemv.gemv(x, weight), F.linear(x, weight))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_split_k_matches_linear(dtype, bias):
    """Three programs share K (one of them past its end): their partial sums and the bias added once."""
    x, weight = randn(5, 200, dtype=dtype, seed=1), randn(36, 200, dtype=dtype, seed=2, scale=200**-0.5)
    b = randn(36, dtype=dtype, seed=3) if bias else None
    assert_close(gemv.gemv(x, weight, b, SPLIT), F.linear(x, weight, b))


def _norm_inputs(rows: int, k: int, n: int, dtype: torch.dtype, residual: bool, bias: bool):
    x, norm_weight = randn(rows, k, dtype=dtype, seed=4), randn(k, dtype=dtype, seed=5)
    res = randn(rows, k, dtype=dtype, seed=6) if residual else None
    weight = randn(n, k, dtype=dtype, seed=7, scale=k**-0.5)
    return x, res, norm_weight, weight, randn(n, dtype=dtype, seed=8) if bias else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_norm_gemv_matches_reference(dtype, rows, residual, silu_mul):
    """The qkv (norm, bias: Qwen2) and gate_up (norm, SiLU*mul) forms; the new residual is a new tensor
    holding ``x + residual`` rounded once, the old one untouched (None: ``x`` itself)."""
    x, res, norm_weight, weight, bias = _norm_inputs(rows, 96, 48, dtype, residual, bias=not silu_mul)
    before = None if res is None else res.clone()
    expected, expected_residual = gemv.norm_gemv_reference(x, res, norm_weight, 1e-6, weight, bias, silu_mul)
    out, new_residual = gemv.norm_gemv(x, res, norm_weight, 1e-6, weight, bias, silu_mul, TILE)
    assert out.shape == (rows, 24 if silu_mul else 48)
    assert_close(out, expected)
    if residual:
        assert torch.equal(res, before) and torch.equal(new_residual, expected_residual)
    else:
        assert new_residual is x


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_gemv_split_k(dtype):
    """Each split recomputes the rows' rstd over the whole row and writes its part of the new residual."""
    x, res, norm_weight, weight, bias = _norm_inputs(4, 200, 40, dtype, residual=True, bias=True)
    expected, expected_residual = gemv.norm_gemv_reference(x, res, norm_weight, 1e-5, weight, bias)
    out, new_residual = gemv.norm_gemv(x, res, norm_weight, 1e-5, weight, bias, config=SPLIT)
    assert_close(out, expected)
    assert torch.equal(new_residual, expected_residual)


def test_reference_is_the_decoder_layer_math():
    """``norm_gemv_reference`` is what the triton path ran before: fused add-norm, matmul, SiLU*mul."""
    from common.engine.kernels import activation, norm

    x, res, norm_weight, weight, _ = _norm_inputs(3, 64, 32, torch.float32, residual=True, bias=False)
    h, residual = norm.fused_add_rms_norm_reference(x, res.clone(), norm_weight, 1e-6)
    out, new_residual = gemv.norm_gemv_reference(x, res, norm_weight, 1e-6, weight, silu_mul=True)
    assert torch.equal(out, activation.silu_and_mul_reference(F.linear(h, weight)))
    assert torch.equal(new_residual, residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_n", [1, 2, 4])
def test_row_kernel_matches_linear(dtype, block_n):
    """Output blocks over 3 programs: 40 / 300 / 7 outputs leave programs with different block counts."""
    for i, (n, k) in enumerate([*SHAPES, (7, 33)]):
        x, weight = randn(1, k, dtype=dtype, seed=i), randn(n, k, dtype=dtype, seed=10 + i, scale=k**-0.5)
        bias = randn(n, dtype=dtype, seed=20 + i) if i % 2 else None
        assert_close(gemv.gemv(x, weight, bias, RowConfig(block_n=block_n)), F.linear(x, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_row_kernel_norm_forms(dtype, residual, silu_mul):
    """The fused forms on the one-row kernel: the row normalised once per program, the residual written once."""
    x, res, norm_weight, weight, bias = _norm_inputs(1, 96, 52, dtype, residual, bias=True)
    before = None if res is None else res.clone()
    expected, expected_residual = gemv.norm_gemv_reference(x, res, norm_weight, 1e-6, weight, bias, silu_mul)
    out, new_residual = gemv.norm_gemv(x, res, norm_weight, 1e-6, weight, bias, silu_mul)
    assert out.shape == (1, 26 if silu_mul else 52)
    assert_close(out, expected)
    if residual:
        assert torch.equal(res, before) and torch.equal(new_residual, expected_residual)
    else:
        assert new_residual is x


def test_one_row_defaults_to_the_row_kernel(monkeypatch):
    """A one-row call without a config (the model's batch-1 decode) runs ``row_gemv``; two rows, or a row
    longer than ``row_gemv.MAX_K``, run the tiled kernel."""
    calls = []
    launch = row_gemv.launch
    monkeypatch.setattr(row_gemv, "launch", lambda *a: calls.append(a[-1]) or launch(*a))
    monkeypatch.setattr(row_gemv, "MAX_K", 64)
    weight = randn(24, 64, seed=2, scale=0.1)
    for x in (randn(1, 64, seed=1), randn(2, 64, seed=1)):
        assert_close(gemv.gemv(x, weight), F.linear(x, weight))
    gemv.gemv(randn(1, 65, seed=3), randn(24, 65, seed=4))
    assert calls == [row_gemv.pick_config(64)]


def test_bad_shapes_raise():
    x, weight = randn(gemv.MAX_ROWS + 1, 64), randn(16, 64)
    with pytest.raises(ValueError, match="at most 8 rows"):
        gemv.gemv(x, weight)
    with pytest.raises(ValueError, match="common, contiguous K"):
        gemv.gemv(x[:2], randn(16, 32))
    with pytest.raises(ValueError, match="bias"):
        gemv.gemv(x[:2], weight, randn(8))
    with pytest.raises(ValueError, match="split_k 1"):
        gemv.norm_gemv(x[:2], None, randn(64), 1e-6, weight, silu_mul=True, config=SPLIT)
    with pytest.raises(ValueError, match="residual"):
        gemv.norm_gemv(x[:2], randn(2, 64, dtype=torch.float16), randn(64), 1e-6, weight)
    with pytest.raises(ValueError, match="one-row kernel"):
        gemv.gemv(x[:2], weight, config=RowConfig())
    with pytest.raises(ValueError, match="one-row kernel"):
        gemv.gemv(randn(1, row_gemv.MAX_K + 1), randn(2, row_gemv.MAX_K + 1), config=RowConfig())


def test_default_config_covers_the_h200():
    """The 1B and 8B shapes' projections get at least 1,024 programs (~8 per H200 SM) and load K in steps of
    64 to ``MAX_BLOCK_K`` elements (16-byte loads), never more than K rounded up."""
    for n, k, silu_mul in ((3072, 2048, False), (2048, 2048, False), (8192, 2048, True), (2048, 8192, False),
                           (6144, 4096, False), (14336, 4096, True), (4096, 14336, False), (3, 40, False)):
        config = gemv.pick_config(n, k, silu_mul)
        assert n < 1024 or -(-n // config.block_n) >= 1024
        assert 64 <= config.block_k <= max(64, min(gemv.MAX_BLOCK_K, 1 << (k - 1).bit_length()))
