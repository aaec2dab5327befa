"""``host_copies.to_device_aligned``: each segment a view starting 16-byte aligned, whatever the lengths, with
the segment's values; and ``AttentionMetadata.build``'s views, made with it, for batches of every parity."""

import pytest
import torch

from common.engine.attention import AttentionMetadata
from common.engine.host_copies import ALIGN_BYTES, to_device_aligned

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bool])
def test_every_segment_starts_aligned_and_holds_its_values(dtype):
    segments = [[1] * n for n in (0, 1, 2, 3, 5, 8, 17)]
    views = to_device_aligned(segments, dtype, CPU)
    assert [v.tolist() for v in views] == [torch.tensor(s, dtype=dtype).tolist() for s in segments]
    assert all(v.data_ptr() % ALIGN_BYTES == 0 for v in views)
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1  # one buffer: one copy to the device


@pytest.mark.parametrize("query_lens", [[1], [4, 1], [3, 2, 7], [1, 1, 1, 1, 1]])
def test_attention_metadata_views_are_aligned(query_lens):
    context_lens = [q + 10 for q in query_lens]
    tables = [[i, i + 8][: (c + 15) // 16] for i, c in enumerate(context_lens)]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, 16, CPU)
    for t in (meta.query_start_loc, meta.context_lens, meta.slot_mapping, meta.block_tables):
        assert t.data_ptr() % ALIGN_BYTES == 0
    assert meta.context_lens.tolist() == context_lens and meta.query_start_loc[-1] == sum(query_lens)
    assert meta.block_tables.shape == (len(query_lens), max(len(t) for t in tables))
