"""Engine warm-up (``common.engine.warmup``), run on CPU: with ``RerunGraphs`` standing in for CUDA graphs
every decode bucket is captured before serving, the prefill's logits are sampled, and what the warm-up leaves
behind changes no output."""

from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.warmup import warm_up
from common.messages import SamplingParams
from test_cuda_graph import PROMPT_LENGTHS, RerunGraphs, make_engine

SAMPLING = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[(7 * i + 3 * n) % 300 + 3 for i in range(n)] for n in PROMPT_LENGTHS]


def tokens(engine: LLMEngine) -> list[list[int]]:
    return [o.new_token_ids for o in engine.generate(PROMPTS, SAMPLING)]


def test_captures_every_bucket_first_and_changes_no_output():
    expected = tokens(make_engine(max_num_seqs=8, enable_prefix_caching=True))
    engine = make_engine(max_num_seqs=8, max_model_len=100, enable_prefix_caching=True)  # 7 blocks of 16
    runner = engine.runner
    runner.graphs = RerunGraphs(runner.model, runner.kv_cache, 8, engine.max_model_len)
    sampled = []
    warm_up(runner, 64, 8, engine.max_model_len, sample=sampled.append)
    assert [tuple(logits.shape) for logits in sampled] == [(1, engine.model_config.vocab_size)]  # the prefill's
    # batch buckets 1, 2, 4, 8 x block buckets 1, 2, 4, 7 (7: max_model_len's, the cap)
    assert sorted(runner.graphs.captured) == [(b, n) for b in (1, 2, 4, 8) for n in (1, 2, 4, 7)]
    assert engine.block_manager.num_used == 0
    captured = len(runner.graphs.captured)
    assert tokens(engine) == expected  # the blocks the warm-up wrote in held nothing any request reads
    assert len(runner.graphs.captured) == captured  # serving captured nothing more


def test_eager_warm_up_under_tensor_parallelism():
    """The ranks run the warm-up's steps together (a rank left out would hang the next collective)."""
    config = dict(model="demo", dtype="float32", device="cpu", num_kv_blocks=64, max_num_seqs=4)
    expected = tokens(LLMEngine(EngineConfig(**config)))
    engine = LLMEngine(EngineConfig(**config, tensor_parallel_size=2, tensor_parallel_timeout_s=30))
    try:
        warm_up(engine.runner, 64, 4, engine.max_model_len, engine.workers.call)
        assert tokens(engine) == expected
    finally:
        engine.close()


def test_prefill_is_capped_by_the_cache_and_the_model():
    """A chunk of 4,096 tokens would index past a cache of 3 blocks, or past a context of 40 positions."""
    small_cache = LLMEngine(EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=3, block_size=16,
                                         max_num_seqs=2))
    for engine in (small_cache, make_engine(max_num_seqs=2, max_model_len=40)):
        warm_up(engine.runner, 4096, 2, engine.max_model_len)
        assert engine.block_manager.num_used == 0
