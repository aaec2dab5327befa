"""Decode CUDA graphs: bucketing, padded input buffers and replay, checked on CPU.

Only CUDA can capture a graph; on CPU ``DecodeGraphs.capture`` makes a ``RerunGraph`` instead
(``replay()`` reruns the same forward over the same fixed buffers into the same output
tensor), so everything else of ``DecodeGraphs`` runs as on a GPU.
"""

import pytest
import torch

from common.engine.config import EngineConfig
from common.engine.cuda_graph import DecodeGraphs, batch_buckets
from common.engine.engine import LLMEngine
from common.messages import SamplingParams

PROMPT_LENGTHS = (5, 30, 17)  # 3 sequences: graph batch 4 (one padded row); contexts cross block boundaries


class RerunGraphs(DecodeGraphs):
    def __init__(self, *args):
        super().__init__(*args)
        self.captured: list[tuple[int, int]] = []
        self.replays = 0

    def capture(self, batch, blocks):
        self.captured.append((batch, blocks))
        graph, out = super().capture(batch, blocks)
        original = graph.replay

        def replay() -> None:
            self.replays += 1
            original()

        graph.replay = replay
        return graph, out


def make_engine(**overrides) -> LLMEngine:
    config = EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=64, block_size=16, **overrides)
    return LLMEngine(config)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_bucket_pads_batch_and_blocks():
    eng = make_engine(max_num_seqs=8, max_model_len=100)  # 7 blocks of 16
    graphs = DecodeGraphs(eng.model, eng.kv_cache, 8, 100)
    assert graphs.bucket(3, 17) == (4, 2)
    assert graphs.bucket(1, 16) == (1, 1)
    assert graphs.bucket(5, 49) == (8, 4)
    assert graphs.bucket(8, 100) == (8, 7)  # blocks capped at max_model_len's
    assert graphs.bucket(9, 10) is None
    with pytest.raises(ValueError, match="no graph"):
        graphs.run([1] * 9, [3] * 9, [[0]] * 9)


def test_cpu_runs_without_graphs():
    assert make_engine().runner.graphs is None  # CPU: always eager


def test_graph_replay_matches_eager_tokens_and_kv():
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + 3 * n) % 300 + 3 for i in range(n)] for n in PROMPT_LENGTHS]
    eager = make_engine(max_num_seqs=8)
    expected = [o.new_token_ids for o in eager.generate(prompts, sampling)]

    graphed = make_engine(max_num_seqs=8)
    runner = graphed.runner
    runner.graphs = RerunGraphs(runner.model, runner.kv_cache, 8, graphed.max_model_len)
    got = [o.new_token_ids for o in graphed.generate(prompts, sampling)]

    assert got == expected
    # contexts 6..53 -> 1, 2 then 4 blocks (powers of two); 3 sequences -> batch bucket 4
    assert runner.graphs.captured == [(4, 2), (4, 4)]
    assert runner.graphs.replays == 24 - 1  # every decode step replayed; the first token came from prefill
    # the padded row wrote nothing but row 0's own K/V: caches agree
    torch.testing.assert_close(graphed.kv_cache.data, eager.kv_cache.data, rtol=0, atol=1e-5)


def test_a_step_stages_its_inputs_without_building_tensors_from_lists(monkeypatch):
    eng = make_engine(max_num_seqs=8, max_model_len=100)
    graphs = DecodeGraphs(eng.model, eng.kv_cache, 8, 100)
    built = []
    with torch.inference_mode():
        graphs.run([5, 6, 7], [3, 20, 40], [[1], [2, 3], [4, 5, 6]])  # captures (4, 4)
        monkeypatch.setattr(torch, "tensor", lambda *a, **k: built.append(a))
        graphs.run([8, 9, 10], [4, 21, 41], [[1], [2, 3], [4, 5, 6]])
    assert built == []


def test_staged_block_tables_follow_every_change():
    """Two staging buffers in turn, each rewriting only rows that changed since it last held them: the device
    tables always equal the step's, also when a row's table keeps its length but not its blocks."""
    eng = make_engine(max_num_seqs=8, max_model_len=100)
    graphs = DecodeGraphs(eng.model, eng.kv_cache, 8, 100)
    steps = [
        [[1], [2, 3], [4, 5, 6]],
        [[1], [2, 3], [4, 5, 6]],
        [[1], [7, 8], [4, 5, 6]],  # row 1: other blocks, same length
        [[1], [7, 8], [4, 5, 6]],
        [[9], [7, 8]],  # a sequence left: rows shift, the padded rows repeat row 0
        [[1, 2, 3], [7, 8], [4, 5, 6], [10]],
    ]
    for tables in steps:
        positions = [16 * len(t) - 1 for t in tables]
        with torch.inference_mode():
            graphs.run([3] * len(tables), positions, tables)
        batch, blocks = graphs.bucket(len(tables), max(positions) + 1)
        rows = tables + [tables[0]] * (batch - len(tables))
        expected = [row + [0] * (blocks - len(row)) for row in rows]
        assert graphs.block_tables[:batch, :blocks].tolist() == expected
        slots = [t[-1] * 16 + 15 for t in rows]
        assert graphs.inputs[:, :batch].tolist() == [
            [3] * batch, [16 * len(t) - 1 for t in rows], slots,
            [16 * len(t) for t in rows], list(range(len(tables))) + [0] * (batch - len(tables))]
