"""Next-token sampling on the device with no host round trip: greedy, temperature, top-k, top-p.

Every input is a device tensor, one entry per row, so a step can sample inside a CUDA graph:
``temperatures`` float32, ``top_ks`` int (0, or >= vocab: off), ``top_ps`` float32 (1.0: off),
``seeds`` and ``steps`` int64.  Per row:

- greedy (temperature 0, or top-k 1, as ``common.engine.sampler.is_greedy``): ``argmax`` of the raw
  logits, ties to the lowest index, exactly ``torch.argmax``;
- otherwise ``argmax(logits / T + g)`` over the tokens top-k and top-p keep, ``g`` standard Gumbel
  noise (the Gumbel-max trick: a draw from ``softmax(logits / T)`` restricted to those tokens).

The noise is a counter-based hash of ``(seed, step, token index)``, not a ``torch.Generator``:
a row's draw depends only on its own seed and step, never on the batch or on earlier draws, and
there is no generator state to carry (a decode continuing a prefill's request passes step =
tokens generated so far; ``Sampler.skip_draw`` has no counterpart).  The stream differs from
``Sampler``'s exponential draws, so seeded outputs differ from the CPU sampler's (same
distribution).  An unseeded request needs a seed all the same (the engine picks one).

Top-k/top-p reduce to one threshold per row on ``logits / T`` (``filter_thresholds``, a sort on
the device, skipped when ``filtering=False``): the value of the last token ``Sampler`` would keep.
Tokens tied with it are all kept (``Sampler`` keeps whichever the sort put first).

The Triton kernel splits each row's vocabulary into parts of ``span`` tokens (a constexpr: 4096
makes 32 programs a row for a 128K vocabulary, enough to fill the GPU at batch 1); each program
writes its best (score, index), and a torch argmax over the parts picks the first best, so ties
still go to the lowest index.  ``argmax`` runs the same kernel with every row greedy (a constexpr: no
noise, no per-row parameters): ``torch.argmax`` of one 128K row uses a handful of blocks on a GPU.
The kernel's scores may differ from the reference's by an ulp (FMA
contraction, ``log`` approximations), which can change a draw only between candidates tied to
within that.
"""

from __future__ import annotations

import torch

from common.engine.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def available() -> bool:
    """Whether the Triton kernel can run (``triton`` importable)."""
    return triton is not None


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on uint32 values held in int64 (products wrap; the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: the 32-bit noise key of each row's ``(seed, step)``."""
    seeds, steps = seeds.long(), steps.long()
    key = _mix(_mix((seeds + _GOLDEN) & _MASK32) ^ ((seeds >> 32) & _MASK32))
    return _mix((key + steps) & _MASK32)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 ``[B, vocab]``: the standard Gumbel noise the kernel adds (``-log(-log(u))``, ``u`` the
    top 24 bits of the hash of ``(row key, index)``, centred in its bin so that ``0 < u < 1``)."""
    key = row_keys(seeds, steps)[:, None]
    index = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    h = _mix((_mix(index ^ key) + key) & _MASK32)
    u = ((h >> 8).float() + 0.5) * 2.0**-24
    return -torch.log(-torch.log(u))


def greedy_rows(temperatures: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: rows decided by argmax (temperature 0 or top-k 1)."""
    return (temperatures == 0) | (top_ks == 1)


def filter_thresholds(scaled: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """float32 ``[B]``: the lowest value of ``scaled`` (logits / T) that top-k then top-p keep
    (``Sampler``'s rule: the top-k, renormalized, then the shortest prefix reaching ``top_p``);
    ``-inf`` for rows that filter nothing."""
    vocab = scaled.shape[-1]
    k = torch.where((top_ks > 0) & (top_ks < vocab), top_ks.long(), vocab)
    ordered = scaled.sort(dim=-1, descending=True).values
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    in_top_k = rank < k[:, None]
    probs = ordered.masked_fill(~in_top_k, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    kept = (in_top_k & (mass_before < top_ps[:, None])).sum(dim=-1).clamp(min=1)
    threshold = ordered.gather(-1, (kept - 1)[:, None])[:, 0]
    no_filter = (k == vocab) & (top_ps >= 1.0)
    return torch.where(no_filter, float("-inf"), threshold)


def _prepare(logits, temperatures, top_ks, top_ps, filtering):
    """(greedy rows, 1/T with 1 on greedy rows, thresholds or None)."""
    greedy = greedy_rows(temperatures, top_ks)
    inv_temps = torch.where(greedy, 1.0, 1.0 / temperatures.float())
    thresholds = filter_thresholds(logits * inv_temps[:, None], top_ks, top_ps) if filtering else None
    return greedy, inv_temps, thresholds


def sample_reference(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    filtering: bool = True,
) -> torch.Tensor:
    """int64 ``[B]``: one token per row of float32 ``logits`` ``[B, vocab]`` (see the module docstring).
    ``filtering=False`` skips top-k/top-p: pass it when no row sets them (a host-side fact)."""
    greedy, inv_temps, thresholds = _prepare(logits, temperatures, top_ks, top_ps, filtering)
    scaled = logits * inv_temps[:, None]
    if thresholds is not None:
        scaled = scaled.masked_fill(scaled < thresholds[:, None], float("-inf"))
    drawn = (scaled + gumbel_noise(seeds, steps, logits.shape[-1])).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def sample(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor,
    top_ps: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    filtering: bool = True,
    block: int = 1024,
    span: int = 4096,
) -> torch.Tensor:
    """Triton ``sample_reference`` (same contract; ``logits`` rows with contiguous columns).  Each row's
    vocabulary is split into ``span``-token parts, one program each, ``block`` tokens an iteration."""
    greedy, inv_temps, thresholds = _prepare(logits, temperatures, top_ks, top_ps, filtering)
    if thresholds is None:
        thresholds = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    return _split_argmax(logits, (inv_temps, thresholds, row_keys(seeds, steps), greedy), block, span)


def argmax(logits: torch.Tensor, block: int = 1024, span: int = 4096) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` exactly (ties to the lowest index, a NaN above every number: the first NaN
    wins) for float32 ``logits`` ``[B, vocab]`` with contiguous columns, split as ``sample`` splits it."""
    return _split_argmax(logits, None, block, span)


def _split_argmax(logits: torch.Tensor, rows: tuple[torch.Tensor, ...] | None, block: int, span: int) -> torch.Tensor:
    """Run ``_sample_kernel`` over ``span``-token parts of each row (``rows``: its per-row 1/T, threshold, noise key
    and greedy flag; None: every row greedy), then take the first best part's index."""
    batch, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"sampling: logits {logits.dtype} with column stride {logits.stride(1)} (float32, 1)")
    block = min(block, triton.next_power_of_2(vocab))
    span = triton.cdiv(min(span, vocab), block) * block
    splits = triton.cdiv(vocab, span)
    best = torch.empty(batch, splits, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(batch, splits, dtype=torch.int64, device=logits.device)
    if batch:
        _sample_kernel[(batch, splits)](
            logits, logits.stride(0), *(rows or (logits,) * 4), best, best_index, vocab, splits,
            SPAN=span, BLOCK=block, ALL_GREEDY=rows is None, **pdl.options(logits),
        )  # fmt: skip
    return best_index.gather(-1, best.argmax(dim=-1, keepdim=True))[:, 0]


if triton is not None:

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _sample_kernel(
        logits_ptr, row_stride, inv_temp_ptr, threshold_ptr, key_ptr, greedy_ptr, best_ptr, best_index_ptr,
        vocab, splits, SPAN: tl.constexpr, BLOCK: tl.constexpr, ALL_GREEDY: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        """Program (row, split): best (score, lowest index) over ``[split * SPAN, (split + 1) * SPAN)``.
        ``ALL_GREEDY``: the raw logits, the per-row pointers unread, and a NaN scores above all (its first
        index and a NaN score are stored), as ``torch.argmax`` orders them."""
        pdl.wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        if not ALL_GREEDY:
            inv_temp = tl.load(inv_temp_ptr + row)
            threshold = tl.load(threshold_ptr + row)
            key = tl.load(key_ptr + row).to(tl.uint32)
            greedy = tl.load(greedy_ptr + row) != 0
        best = tl.full([], float("-inf"), tl.float32)
        start = split * SPAN
        best_index = start  # kept if all scores are -inf: then part 0 wins, index 0 as torch.argmax
        first_nan = vocab
        for offset in range(0, SPAN, BLOCK):  # SPAN: a multiple of BLOCK
            cols = start + offset + tl.arange(0, BLOCK)
            mask = cols < vocab
            x = tl.load(logits_ptr + row * row_stride + cols, mask=mask, other=float("-inf"))
            if ALL_GREEDY:
                first_nan = tl.minimum(first_nan, tl.min(tl.where(x != x, cols, vocab), axis=0))
                score = tl.where(x != x, float("-inf"), x)
            else:
                scaled = x * inv_temp
                h = _mix32((_mix32(cols.to(tl.uint32) ^ key) + key))
                u = ((h >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24
                noisy = tl.where(scaled >= threshold, scaled - tl.log(-tl.log(u)), float("-inf"))
                score = tl.where(mask, tl.where(greedy, x, noisy), float("-inf"))
            chunk_best = tl.max(score, axis=0)
            chunk_index = start + offset + tl.argmax(score, axis=0, tie_break_left=True)
            best_index = tl.where(chunk_best > best, chunk_index, best_index)
            best = tl.maximum(chunk_best, best)
        if ALL_GREEDY:
            best = tl.where(first_nan < vocab, float("nan"), best)
            best_index = tl.where(first_nan < vocab, first_nan, best_index)
        tl.store(best_ptr + row * splits + split, best)
        tl.store(best_index_ptr + row * splits + split, best_index.to(tl.int64))
