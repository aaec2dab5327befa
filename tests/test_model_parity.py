"""Our model + paged KV cache against ``transformers`` on tiny random checkpoints of each family."""

from __future__ import annotations

import random

import pytest
import torch

from common.engine.attention import AttentionMetadata
from common.engine.demo_model import ensure_demo_checkpoint
from common.engine.kv_cache import KVCache
from common.engine.loader import load_model
from common.engine.model_config import load_model_config
from tests.checkpoints import FAMILIES, make_hf_checkpoint

BLOCK_SIZE = 4
NUM_BLOCKS = 64
TOKEN_RANGE = 300  # input ids are drawn below this; the demo tokenizer (every test vocabulary) is larger


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory, tokenizer_dir):
    """(family, checkpoint dir, reference transformers model, our fp32 model)."""
    path = tmp_path_factory.mktemp(request.param)
    reference = make_hf_checkpoint(path, request.param, tokenizer_dir)
    ours = load_model(path, load_model_config(path), torch.float32, torch.device("cpu"))
    return request.param, path, reference, ours


class PagedRunner:
    """Drives a model step by step: each sequence gets shuffled (non-contiguous) blocks."""

    def __init__(self, model, dtype=torch.float32, seed=0):
        c = model.config
        self.model = model
        self.cache = KVCache(NUM_BLOCKS, c.num_layers, BLOCK_SIZE, c.num_kv_heads, c.head_dim, dtype, "cpu")
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, work: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Compute the new tokens of each ``(seq, tokens)``; returns each one's logits ``[len, vocab]``."""
        query_lens, context_lens, tables, ids, positions = [], [], [], [], []
        for seq, tokens in work:
            start = self.lens.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            self.lens[seq] = end
            query_lens.append(len(tokens))
            context_lens.append(end)
            tables.append(table)
            ids += tokens
            positions += range(start, end)
        meta = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, "cpu")
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.cache)
        logits = self.model.compute_logits(hidden)
        return list(torch.split(logits, query_lens))


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, TOKEN_RANGE, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), f"max |diff| {err} vs max |ref| {ref.abs().max().item()}"


def test_config_normalization(checkpoint):
    family, path, reference, ours = checkpoint
    c, hf = ours.config, reference.config
    assert c.architecture == hf.architectures[0]
    assert (c.num_layers, c.num_heads, c.num_kv_heads) == (2, 4, hf.num_key_value_heads)
    assert c.head_dim == (32 if family == "qwen3" else 16)
    assert c.tie_word_embeddings == (family == "qwen2")
    assert c.attention_bias == (family == "qwen2") and c.qk_norm == (family == "qwen3")
    assert c.rope_scaling == (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16.0} if family == "llama" else None
    )  # fmt: skip
    assert c.sliding_windows == ((12, 12) if family == "mistral" else (None, None))
    assert c.max_model_len == 256 and c.vocab_size > TOKEN_RANGE


def test_full_prompt_logits(checkpoint):
    _, _, reference, ours = checkpoint
    tokens = random_tokens(40, seed=1)
    (logits,) = PagedRunner(ours).step([("a", tokens)])
    assert_close(logits, reference_logits(reference, tokens))


def test_incremental_mixed_batch_logits(checkpoint):
    """Chunked prefill, prefill and decode rows in the same steps, against full-sequence logits."""
    _, _, reference, ours = checkpoint
    seqs = {"a": random_tokens(33, 2), "b": random_tokens(12, 3), "c": random_tokens(19, 4)}
    plan = [
        [("a", slice(0, 20)), ("b", slice(0, 7))],
        [("b", slice(7, 8)), ("a", slice(20, 33)), ("c", slice(0, 16))],
        [("c", slice(16, 17)), ("b", slice(8, 9))],
        [("b", slice(9, 10)), ("c", slice(17, 18))],
        [("c", slice(18, 19)), ("b", slice(10, 12))],
    ]
    runner = PagedRunner(ours, seed=5)
    got: dict[str, list[torch.Tensor]] = {name: [] for name in seqs}
    for step in plan:
        outs = runner.step([(name, seqs[name][rows]) for name, rows in step])
        for (name, _), logits in zip(step, outs):
            got[name].append(logits)
    for name, tokens in seqs.items():
        assert_close(torch.cat(got[name]), reference_logits(reference, tokens))


def test_greedy_generation_matches_transformers(checkpoint):
    """Batched prefill of prompts of length 1, 7, 16, 33, then batched decode: token-identical."""
    _, _, reference, ours = checkpoint
    prompts = {f"p{n}": random_tokens(n, seed=10 + n) for n in (1, 7, 16, 33)}
    steps = 20
    runner = PagedRunner(ours, seed=7)
    generated = {name: [] for name in prompts}
    work = [(name, tokens) for name, tokens in prompts.items()]
    for _ in range(steps):
        outs = runner.step(work)
        for (name, _), logits in zip(work, outs):
            generated[name].append(int(logits[-1].argmax()))
        work = [(name, [generated[name][-1]]) for name in prompts]
    for name, tokens in prompts.items():
        out = reference.generate(
            torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
            do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
        )  # fmt: skip
        assert generated[name] == out[0, len(tokens) :].tolist(), name


def test_sharded_checkpoint_loads_identically(tmp_path, tokenizer_dir):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    make_hf_checkpoint(single, "llama", tokenizer_dir, seed=3)
    make_hf_checkpoint(sharded, "llama", tokenizer_dir, seed=3, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = load_model(single, load_model_config(single), torch.float32, "cpu").state_dict()
    b = load_model(sharded, load_model_config(sharded), torch.float32, "cpu").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_smoke(checkpoint, dtype):
    _, path, reference, _ = checkpoint
    model = load_model(path, load_model_config(path), dtype, "cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    runner = PagedRunner(model, dtype=dtype)
    tokens = random_tokens(21, seed=8)
    prefill = runner.step([("a", tokens[:20])])[0]
    decode = runner.step([("a", tokens[20:])])[0]
    logits = torch.cat([prefill, decode])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # close to the fp32 reference at half precision's accuracy
    ref = reference_logits(reference, tokens)
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()


def test_metadata_index_math():
    meta = AttentionMetadata.build([3, 1], [5, 9], [[7, 2], [4, 0, 5]], BLOCK_SIZE, "cpu")
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    # seq 0 positions 2,3,4 -> block 7 offsets 2,3 then block 2 offset 0; seq 1 position 8 -> block 5 offset 0
    assert meta.slot_mapping.tolist() == [30, 31, 8, 20]
    assert meta.block_tables.tolist() == [[7, 2, 0], [4, 0, 5]]
    assert (meta.max_query_len, meta.max_context_len) == (3, 9)
    assert meta.token_seq_ids.tolist() == [0, 0, 0, 1] and meta.token_offsets.tolist() == [0, 1, 2, 0]
    mask = meta.attention_mask()[:, 0]
    assert mask[0, 0].tolist() == [True] * 3 + [False] * 6  # position 2 sees 0..2
    assert mask[1, 0].tolist() == [True] * 9
    assert meta.attention_mask(sliding_window=2)[1, 0, 0].tolist() == [False] * 7 + [True] * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (([1], [1, 2], [[0]]), "one query_len"),
        (([0], [3], [[0]]), "1 <= query_len <= context_len"),
        (([4], [3], [[0]]), "1 <= query_len <= context_len"),
        (([1], [5], [[0]]), "only 1 blocks"),
    ],
)
def test_metadata_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        AttentionMetadata.build(*args, BLOCK_SIZE, "cpu")


def test_kv_cache_is_head_major():
    cache = KVCache(5, 3, BLOCK_SIZE, 2, 8, torch.float16, "cpu")
    assert KVCache.LAYOUT == "head-major"
    assert cache.data.shape == (5, 2, BLOCK_SIZE, 3, 2, 8)
    assert cache.block_bytes == 3 * 2 * BLOCK_SIZE * 2 * 8 * 2
    assert cache.block_bytes == KVCache.bytes_per_block(3, BLOCK_SIZE, 2, 8, torch.float16)
    k, v = cache.layer(1)
    assert k.shape == v.shape == (5, 2, BLOCK_SIZE, 8)  # [blocks, heads, offsets, head_dim]
    k[3, 1] = 1.0
    v[3, 0, 2] = 2.0
    block = cache.block_view(3)
    assert block.is_contiguous()
    assert block.data_ptr() == cache.data.data_ptr() + 3 * cache.block_bytes
    assert block.sum() == BLOCK_SIZE * 8 * 1 + 8 * 2 and cache.data.sum() == block.sum()
    head_bytes = cache.block_bytes // 2  # head 1 of block 3 is the second half of the block
    head = block[1].view(-1).view(torch.uint8)
    assert head.data_ptr() == block.data_ptr() + head_bytes and head.numel() == head_bytes
    assert block[1, :, 1, 0].eq(1.0).all() and not block[1, :, [0, 2]].any()  # layer 1's K of head 1
    assert block[0, 2, 1, 1].eq(2.0).all() and block[0].sum() == 8 * 2  # layer 1's V of head 0, offset 2
    row = cache.plane_rows(torch.tensor(3 * BLOCK_SIZE + 2), torch.tensor(0))  # block 3, offset 2, head 0
    assert v.view(-1, 8)[row].eq(2.0).all() and v.view(-1, 8).data_ptr() == v.data_ptr()
    with pytest.raises(IndexError):
        cache.layer(3)
    with pytest.raises(ValueError, match="num_blocks"):
        KVCache(0, 3, BLOCK_SIZE, 2, 8, torch.float16, "cpu")


def test_mixed_batches_attend_in_decode_and_prefill_parts():
    """Decode rows are never padded to a prefill chunk's queries and keys."""
    meta = AttentionMetadata.build([1, 4, 1, 3], [9, 4, 30, 40], [[0], [1], [2, 3], [4, 5, 6]], 16, "cpu")
    (decode_tokens, decode), (prefill_tokens, prefill) = meta.parts
    assert decode_tokens.tolist() == [0, 5] and (decode.max_query_len, decode.max_context_len) == (1, 30)
    assert prefill_tokens.tolist() == [1, 2, 3, 4, 6, 7, 8] and prefill.max_query_len == 4
    assert prefill.slot_mapping.tolist() == meta.slot_mapping[prefill_tokens].tolist()
    assert not AttentionMetadata.build([1, 1], [5, 9], [[0], [1]], 16, "cpu").parts
    assert not AttentionMetadata.build([3, 4], [3, 4], [[0], [1]], 16, "cpu").parts
