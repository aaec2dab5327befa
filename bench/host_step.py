"""Host time of one ``LLMEngine`` decode step: everything but the model's forward, same run, the ratio.

    python -m bench.host_step --device cpu --batch-sizes 1,32
    python -m bench.host_step --device cuda --model /tmp/llama-1b --dtype bfloat16 --batch-sizes 1,32

``B`` random prompts go into decode (``bench.decode_floor.start_decoding``); after ``--warmup``
steps ``--steps`` steps are timed, ``--repeats`` times (the least median is the figure: on a
shared machine the least disturbed window), with async scheduling and then, same engine and
batch, with synchronous steps (the baseline).  Per step:

* ``step_ms``: from one ``step()``'s return to the next's (``decode_floor.time_steps``);
* ``fwd_ms``: the model's forward and logits: on CPU the time inside them (module hooks,
  wrappers); on CUDA the device time between events recorded around them (around each decode
  graph's replay or the eager forward, and the LM head), read after the window;
* CPU: the decode graphs' path with ``RerunGraph`` replays, one torch thread, times in process
  CPU seconds (steadier than wall time on a shared machine); ``host_ms`` = ``step_ms`` - ``fwd_ms``
  (torch runs every op synchronously there, so the step is the sum), and ``host/fwd``; ``--model``
  defaults to ``tiny`` (one layer of width 32, a 2,048-token vocabulary: the demo tokenizer's
  bytes plus fillers, so most sampled ids decode to text; written to a temporary directory);
  ``--null-forward``: replays do nothing, so ``step_ms`` is the host's work alone (it runs on
  trees whose ``DecodeGraphs`` cannot capture off CUDA too: the before/after of a change);
* CUDA: ``gpu_busy`` = ``fwd_ms`` / ``step_ms`` (the forward's device time over the period; under
  async scheduling the host's work per step hides behind the step in flight while it is shorter).

``--profile N``: cProfile over N more async steps of each batch, its top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import logging
import pstats
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.decode_floor import start_decoding, sync, time_steps
from bench.tp_step import int_list
from common.arith import ceil_div
from common.engine.config import EngineConfig
from common.engine.cuda_graph import DecodeGraphs, Graph
from common.engine.demo_model import DEMO_SHAPE, write_random_checkpoint
from common.engine.engine import LLMEngine

BLOCK_SIZE = 16
TINY_SHAPE = {**DEMO_SHAPE, "vocab_size": 2048, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}  # fmt: skip


class ForwardTimer:
    """Time spent in the model's forward and logits, per window: hooks around the eager forward, wrappers
    around each decode graph's replay and ``compute_logits`` (on CUDA events, read by ``take``)."""

    def __init__(self, engine: LLMEngine):
        self.cuda = engine.device.type == "cuda"
        self.spans: list = []
        self.began = None
        self.depth = 0  # a replay off CUDA reruns the hooked forward: time the outer span only
        engine.model.register_forward_pre_hook(lambda *_: self._begin())
        engine.model.register_forward_hook(lambda *_: self._end())
        compute_logits = engine.model.compute_logits

        def timed_logits(hidden: torch.Tensor) -> torch.Tensor:
            self._begin()
            logits = compute_logits(hidden)
            self._end()
            return logits

        engine.model.compute_logits = timed_logits
        graphs = engine.runner.graphs
        capture = graphs.capture
        graphs.capture = lambda batch, blocks: self._timed(*capture(batch, blocks))
        graphs.graphs = {key: self._timed(*value) for key, value in graphs.graphs.items()}

    def _timed(self, graph: Graph, hidden: torch.Tensor) -> tuple[Graph, torch.Tensor]:
        timer = self

        class Timed:
            def replay(self) -> None:
                timer._begin()
                graph.replay()
                timer._end()

        return Timed(), hidden

    def _now(self):
        if not self.cuda:
            return time.process_time()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _begin(self) -> None:
        self.depth += 1
        if self.depth == 1 and not (self.cuda and torch.cuda.is_current_stream_capturing()):
            self.began = self._now()

    def _end(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.began is not None:
            self.spans.append((self.began, self._now()))
            self.began = None

    def take(self) -> float:
        """Seconds of forward since the last ``take``."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(begin.elapsed_time(end) for begin, end in self.spans) / 1e3
        else:
            total = sum(end - begin for begin, end in self.spans)
        self.spans = []
        return total


class NullGraph:
    """``--null-forward``'s decode graph: replaying it computes nothing."""

    def replay(self) -> None:
        pass


@dataclass
class Window:
    step_s: float  # mean step
    fwd_s: float  # mean forward

    @property
    def host_s(self) -> float:
        return self.step_s - self.fwd_s


def measure(engine: LLMEngine, seqs, timer: ForwardTimer, steps: int, repeats: int) -> Window:
    """The least disturbed of ``repeats`` windows of ``steps`` steps (least mean step)."""
    windows = []
    clock = time.perf_counter if timer.cuda else time.process_time
    for _ in range(repeats):
        timer.take()
        start = clock()
        time_steps(engine, seqs, steps)
        sync(engine.device)
        windows.append(Window((clock() - start) / steps, timer.take() / steps))
    return min(windows, key=lambda w: w.step_s)


def profile(engine: LLMEngine, seqs, steps: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    time_steps(engine, seqs, steps)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def tiny_checkpoint(directory: Path) -> str:
    write_random_checkpoint(directory, TINY_SHAPE, 0, torch.device("cpu"))
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (written here), 'demo' or a model directory")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 32], help="comma-separated batch sizes")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens of each sequence")
    parser.add_argument("--warmup", type=int, default=20, help="decode steps before timing")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per mode (least median reported)")
    parser.add_argument("--null-forward", action="store_true",
                        help="CPU: decode graph replays do nothing (the host path alone; tokens are garbage)")
    parser.add_argument("--profile", type=int, default=0, help="cProfile this many more async steps per batch")
    args = parser.parse_args()
    if args.null_forward and args.device != "cpu":
        parser.error("--null-forward is for --device cpu")
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch-sizes and --steps, --repeats must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="host-step-") as tmp:
        model = tiny_checkpoint(Path(tmp)) if args.model == "tiny" else args.model
        run(args, model)


def run(args: argparse.Namespace, model: str) -> None:
    total = args.warmup + 2 * args.repeats * args.steps + args.profile + 10  # + start, mode switches, slack
    max_len = args.input_len + total
    batch = max(args.batch_sizes)
    engine = LLMEngine(EngineConfig(
        model=model, dtype=args.dtype, device=args.device, max_num_seqs=batch, max_model_len=max_len,
        num_kv_blocks=batch * ceil_div(max_len, BLOCK_SIZE) + 1, block_size=BLOCK_SIZE, async_scheduling=True,
    ))  # fmt: skip
    if engine.runner.graphs is None:  # CPU: the decode graphs' path, replays rerunning the forward
        torch.set_num_threads(1)
        engine.runner.graphs = DecodeGraphs(engine.model, engine.kv_cache, batch, max_len)
    if args.null_forward:
        graphs = engine.runner.graphs
        graphs.capture = lambda batch, blocks: (NullGraph(), graphs.forward(batch, blocks))
    timer = ForwardTimer(engine)
    gc.collect()
    gc.freeze()  # as ``serve`` does once its engine is up: the steps' collections skip what was built
    rows = []
    for b in args.batch_sizes:
        seqs = start_decoding(engine, b, args.input_len, total, seed=b)
        time_steps(engine, seqs, args.warmup)
        on = measure(engine, seqs, timer, args.steps, args.repeats)
        engine.async_scheduling = False
        time_steps(engine, seqs, 3)
        off = measure(engine, seqs, timer, args.steps, args.repeats)
        engine.async_scheduling = True
        time_steps(engine, seqs, 2)
        if args.profile:
            print(f"--- cProfile, batch {b}, {args.profile} async steps")
            profile(engine, seqs, args.profile)
        for seq in seqs:
            engine.abort(seq.request_id)
        while engine.has_unfinished():
            engine.step()
        rows.append((b, on, off))
    cuda = engine.device.type == "cuda"
    print(f"device {torch.cuda.get_device_name(engine.device) if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{engine.dtype_name}, model {args.model}, {args.steps} steps x {args.repeats} windows")
    if cuda:
        print("batch  mode   step_ms  fwd_ms  gpu_busy")
        for b, on, off in rows:
            for mode, w in (("async", on), ("sync", off)):
                print(f"{b:5d}  {mode:5s}  {w.step_s * 1e3:7.3f}  {w.fwd_s * 1e3:6.3f}  {w.fwd_s / w.step_s:8.1%}")
    else:
        print("batch  mode   step_ms  fwd_ms  host_ms  host/fwd")
        for b, on, off in rows:
            for mode, w in (("async", on), ("sync", off)):
                ratio = f"{'-':>8}" if args.null_forward else f"{w.host_s / w.fwd_s:7.2f}x"
                print(f"{b:5d}  {mode:5s}  {w.step_s * 1e3:7.3f}  {w.fwd_s * 1e3:6.3f}  {w.host_s * 1e3:7.3f}  {ratio}")


if __name__ == "__main__":
    main()
