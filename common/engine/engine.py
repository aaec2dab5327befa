"""``LLMEngine``: synchronous, single-threaded; ``step()`` runs one batch and reports per request.

P/D hooks (see docs/architecture.md "Engine contract"): ``add_request(...,
pin_for_transfer=...)`` on prefill, ``add_remote_request(RemoteRequest)`` /
``finish_remote_kv`` on decode, ``release_transfer`` when the decode side is done reading.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import torch

from common.config import require
from common.engine.block_manager import BlockManager
from common.engine.config import EngineConfig
from common.engine.detokenizer import Detokenizer
from common.engine.inflight_step import InflightStep, computing_for
from common.engine.kernels.backend import resolve_attention_backend
from common.engine.kv_cache import Allocate, zeros
from common.engine.loader import load_tokenizer, parse_dtype, resolve_model_path
from common.engine.model_config import ModelConfig, load_model_config
from common.engine.model_runner import ModelRunner
from common.engine.parallel import SINGLE, TensorParallel, TensorParallelError
from common.engine.sampler import Sampler
from common.engine.scheduler import Scheduler
from common.engine.kv_push import report_pushes
from common.engine.sequence import (
    InvalidRequest,
    KVPush,
    RemoteAllocation,
    RemoteRequest,
    RequestOutput,
    Sequence,
    SequenceStatus,
)
from common.engine.request_checks import validate_request
from common.engine.stats import StepStats
from common.engine.tp_workers import WorkerRanks, load_rank
from common.engine.warmup import warm_up
from common.kv_offload.host_copier import HostCopier
from common.kv_offload.tier import OffloadTier, host_slots
from common.messages import SamplingParams, TokenLogprob, Usage

logger = logging.getLogger(__name__)

# What the warm-up samples its prefill's logits with: greedy, which runs the sampler's split argmax kernel on CUDA;
# the other sampling paths are torch operators, which compile nothing.
WARM_UP_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    require(device.type != "cuda" or torch.cuda.is_available(), "device", f"{name} requested but CUDA is not available")
    return device


class LLMEngine:
    """With ``tensor_parallel_size`` N > 1 this process is rank 0 of N: it starts the other ranks
    (``WorkerRanks``), broadcasts every step to them, and ``close()`` stops them."""

    def __init__(self, config: EngineConfig, kv_allocate: Allocate = zeros, kv_transfer: dict | None = None):
        """``kv_allocate`` allocates the KV cache tensor (a shared-memory file where the shm transport serves it);
        with ``kv_transfer`` (a P/D instance's KV transfer config fields) the other ranks serve their KV too,
        and ``worker_kv`` holds what each published about it."""
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        path = resolve_model_path(config.model)
        self.model_config: ModelConfig = load_model_config(path)
        self.dtype = parse_dtype(config.dtype, self.model_config, self.device)
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        self.tokenizer = load_tokenizer(config, path, self.model_config.vocab_size)
        if config.trust_remote_code:
            logger.warning("--trust-remote-code is ignored: pdserve never runs a model's custom code")
        model_len = self.model_config.max_model_len
        require(
            config.max_model_len is None or config.max_model_len <= model_len,
            "max_model_len",
            f"{config.max_model_len} exceeds the model's context length {model_len}",
        )
        self.max_model_len: int = config.max_model_len or model_len
        self.block_size = config.block_size
        self.workers: WorkerRanks | None = None
        self.tp: TensorParallel = SINGLE
        self.worker_kv: list[bytes] = []  # per worker rank: its KV agent's info (common.kv_transfer.rank_agent)
        try:
            self._build(path, kv_allocate, kv_transfer)
        except BaseException as e:
            if self.workers is not None:  # they are loading or at the start barrier, not waiting for a stop
                self.workers.fail(TensorParallelError(f"rank 0 failed to start: {e!r}"))
            self.close()
            raise

    def _build(self, path, kv_allocate: Allocate, kv_transfer: dict | None) -> None:
        """Start the other ranks (TP > 1), load this rank's weights, allocate its KV cache, build the rest."""
        config, mc = self.config, self.model_config
        if config.tensor_parallel_size > 1:
            self.workers, self.tp = WorkerRanks.launch(config, mc, path, self.dtype_name, self.device, kv_transfer)
        self.model, self.kv_cache = load_rank(
            config, mc, path, self.dtype, self.device, self.max_model_len, self.tp, self.attention_backend,
            kv_allocate,
        )
        if self.workers is not None and kv_transfer is not None:
            self.worker_kv = self.workers.published("kv")
        self.eos_token_ids = frozenset(mc.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.block_manager = BlockManager(self.kv_cache.num_blocks, self.block_size, config.enable_prefix_caching)
        slots = host_slots(config, mc, self.dtype)
        self.offload = OffloadTier(self.block_manager, slots) if slots else None
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   self.offload)
        self.runner = ModelRunner(
            self.model, self.kv_cache, self.device, config.max_num_seqs, self.max_model_len, config.enforce_eager,
            self.tp, HostCopier(self.kv_cache, slots) if slots else None,
        )
        self.sampler = Sampler(config.seed, self.device)
        on = self.device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
        self.async_scheduling = on and self.workers is None
        self.launched: list[InflightStep] = []  # at most two; [-1] is in flight (async scheduling)
        if self.device.type == "cuda":
            warm_up(self.runner, config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len,
                    self.workers.call if self.workers is not None else lambda fn: fn(),
                    lambda logits: self.sampler(logits, [WARM_UP_SAMPLING], [None]))
        self.requests: dict[str, Sequence] = {}
        self.pending_outputs: list[RequestOutput] = []  # finished outside step() (abort, failed KV): next step returns them
        self._offline_count = 0
        logger.info(
            "engine ready: model %s, %s on %s, %d KV blocks of %d tokens (%.1f MiB), max_model_len %d, TP %d, "
            "attention backend %s%s",
            path, self.dtype_name, self.device, self.kv_cache.num_blocks, self.block_size,
            self.kv_cache.num_blocks * self.kv_cache.block_bytes / 2**20, self.max_model_len, self.tp.world_size,
            self.attention_backend, " with decode GEMVs" if self.model.decode_gemv else "",
        )  # fmt: skip

    def check_health(self) -> None:
        """Raise ``TensorParallelError`` if a tensor-parallel rank exited (nothing to check with TP 1)."""
        if self.workers is not None:
            self.workers.check()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (if any); the engine cannot step afterwards."""
        if self.workers is not None:
            self.workers.close(self.tp)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        pin_for_transfer: str | None = None,
        push: KVPush | None = None,
    ) -> None:
        """Queue a request.  With ``pin_for_transfer`` (prefill for a remote decode) it ends after its first token
        (``remote_decode``), its prompt blocks pinned under that id; push mode: ``push`` gets each step's new KV."""
        self._validate(request_id, prompt_token_ids, sampling, pin_for_transfer)
        seq = self._new_sequence(request_id, prompt_token_ids, sampling, pin_for_transfer)
        seq.push = push
        self.scheduler.add(seq)
        self.requests[request_id] = seq

    def add_remote_request(self, remote: RemoteRequest) -> RemoteAllocation:
        """Allocate blocks for a prompt whose KV a remote prefill computed; the request waits in
        ``WAITING_FOR_REMOTE_KVS`` until ``finish_remote_kv``.  Raises ``NoFreeBlocks`` when the
        blocks are not free now (nothing is held then; retry after blocks free)."""
        prompt = remote.prompt_token_ids
        self._validate(remote.request_id, prompt, remote.sampling, None)
        if remote.num_remote_tokens != len(prompt):
            raise InvalidRequest(
                f"num_remote_tokens {remote.num_remote_tokens} != prompt length {len(prompt)}", "num_remote_tokens"
            )
        if remote.first_token_id is not None and not 0 <= remote.first_token_id < self.model_config.vocab_size:
            raise InvalidRequest(f"first_token_id {remote.first_token_id} is outside the vocabulary", "first_token_id")
        seq = self._new_sequence(remote.request_id, prompt, remote.sampling, None)
        seq.remote_first_token = remote.first_token_id
        if seq.generator is not None:
            self.sampler.skip_draw(seq.generator, remote.sampling, self.model_config.vocab_size)
        allocation = self.scheduler.add_remote(seq)
        self.requests[remote.request_id] = seq
        return allocation

    def finish_remote_kv(self, request_id: str, ok: bool) -> bool:
        """The connector is done with a remote request's blocks: ``ok`` = its KV landed.  On failure
        ``kv_load_failure_policy`` applies: recompute the prompt locally, or fail the request.
        False if the request is gone (aborted meanwhile); ``InvalidRequest`` if it is not waiting."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        if seq.status is not SequenceStatus.WAITING_FOR_REMOTE_KVS:
            raise InvalidRequest(f"request {request_id!r} is not waiting for remote KV", "request_id")
        if not ok and self.config.kv_load_failure_policy == "fail":
            out = RequestOutput(request_id, [], "", error="reading the prompt's KV from the prefill engine failed")
            self._finish(seq, "error", out)
            self.pending_outputs.append(out)
            return True
        if not ok:
            logger.warning("request %s: remote KV failed, recomputing %d tokens", request_id, seq.num_prompt_tokens)
        first = seq.remote_first_token
        self.scheduler.finish_remote(seq, ok, first)
        seq.first_token_time = seq.kv_ready_time = time.monotonic()
        reason = self._stop_reason(seq, first, seq.detokenizer.append_emitted(first) is not None, seq.num_tokens)
        if reason is not None:  # no step will register its landed blocks as cache hits: now, before they free
            self.block_manager.commit(seq)
            out = RequestOutput(request_id, [], "")
            self._finish(seq, reason, out)
            self.pending_outputs.append(out)
        return True

    def hash_prompt(self, request_id: str) -> None:
        """``BlockManager.hash_prompt`` of a request's prompt, if the request is still here."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self.block_manager.hash_prompt(seq)

    def release_transfer(self, transfer_id: str) -> bool:
        """Unpin a transfer's blocks; False if unknown (already released)."""
        return self.block_manager.unpin(transfer_id)

    def abort(self, request_id: str) -> bool:
        """Stop a request at any stage and free its blocks; the next ``step()`` reports it
        (finish reason ``abort``).  False if it is unknown or already finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        out = RequestOutput(request_id, [], seq.detokenizer.take(final=True))
        self._finish(seq, "abort", out)
        self.pending_outputs.append(out)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests or self.pending_outputs or self.launched)

    def has_work(self) -> bool:
        """Whether ``step()`` would do anything now (False while every request waits for remote KV and no
        launched step waits to be processed)."""
        offloading = self.offload is not None and self.offload.pending
        return self.scheduler.has_schedulable() or bool(self.pending_outputs or self.launched) or offloading

    def stats(self) -> StepStats:
        bm = self.block_manager
        return StepStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            waiting_for_remote_kvs=len(self.scheduler.remote),
            kv_blocks_used=bm.num_used,
            kv_blocks_pinned=bm.num_pinned,
            kv_blocks_total=bm.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]
    ) -> list[RequestOutput]:
        """Offline batch: run every prompt to completion (the engine must be otherwise idle).
        Returns one output per prompt holding all its tokens, text and logprobs."""
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        ids = [f"generate-{self._offline_count + i}" for i in range(len(prompts))]
        self._offline_count += len(prompts)
        for request_id, prompt, p in zip(ids, prompts, params):
            self.add_request(request_id, prompt, p)
        merged = {request_id: RequestOutput(request_id, [], "", [] if p.logprobs is not None else None)
                  for request_id, p in zip(ids, params)}  # fmt: skip
        while self.has_unfinished():
            for out in self.step():
                total = merged[out.request_id]
                total.new_token_ids += out.new_token_ids
                total.text += out.text
                if total.logprobs is not None and out.logprobs:
                    total.logprobs += out.logprobs
                if out.finished:
                    total.finish_reason, total.usage, total.timings = out.finish_reason, out.usage, out.timings
                    total.num_cached_tokens, total.error = out.num_cached_tokens, out.error
        return [merged[request_id] for request_id in ids]

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that got a token or finished.

        With async scheduling the batch stays in flight (``InflightStep``): its tokens come with the next
        call, which launches the next batch before it processes them.  Synchronous instead (the launched
        step is processed in the same call): TP > 1 (the ranks get host ids only), and the step before a
        possible preemption (``Scheduler.may_preempt``: blocks are freed only with no step in flight)."""
        outputs, self.pending_outputs = self.pending_outputs, []
        if self.launched and self.scheduler.may_preempt():
            outputs += self._retire()
        scheduled = self.scheduler.schedule()
        if scheduled or (self.offload is not None and self.offload.pending):
            self.launched.append(self._launch(scheduled))
            if len(self.launched) > 1:
                outputs += self._retire()  # the previous step's tokens, while this one runs
            self.scheduler.update(scheduled)
            report_pushes(scheduled, self.device)  # before a finishing sequence's blocks are pinned or freed
        while self.launched and not (self.async_scheduling and scheduled):
            outputs += self._retire()
        return outputs

    def _launch(self, scheduled: list[tuple[Sequence, int]]) -> InflightStep:
        """Queue the step's forward pass and sampling; input ids still on the device come from the step in
        flight."""
        offload = self.offload.take_ops() if self.offload is not None else None
        start = time.monotonic()
        for seq, _ in scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = start
        sample = [seq.num_computed_tokens + n == seq.num_tokens for seq, n in scheduled]
        sampling_seqs = [seq for (seq, _), s in zip(scheduled, sample) if s]
        pending = self.launched[-1].tokens if self.launched else None
        run = partial(self.runner.run, scheduled, sample, offload, pending)
        logits = run() if self.workers is None else self.workers.call(run)
        if self.offload is not None:
            self.offload.step_done(offload)
        sampled = None
        if logits is not None:
            sampled = self.sampler.sample(
                logits, [seq.sampling for seq in sampling_seqs], [seq.generator for seq in sampling_seqs]
            )
        return InflightStep(scheduled, sampling_seqs, sampled, start)

    def _retire(self) -> list[RequestOutput]:
        """Process the oldest launched step's tokens (waiting for them) and free what it alone held."""
        step = self.launched.pop(0)
        outputs = [self._append_token(seq, index, token, logprob) for seq, index, token, logprob in step.results()]
        step.release(self.block_manager, self.launched)
        return outputs

    def _append_token(self, seq: Sequence, index: int, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Put the sampled ``token`` at ``index`` of the sequence (its placeholder) and check for its end."""
        seq.token_ids[index] = token
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        stop_token = self._is_stop_token(seq, token)
        stop_string = not stop_token and seq.detokenizer.append(token) is not None
        reason = self._stop_reason(seq, token, stop_string, index + 1)
        if reason is None and seq.pin_for_transfer is not None:
            reason = "remote_decode"
        out = RequestOutput(
            seq.request_id, [token], seq.detokenizer.take(final=reason is not None), [logprob] if logprob else None
        )
        if reason is not None:
            self._finish(seq, reason, out)
        return out

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        return (not seq.sampling.ignore_eos and token in self.eos_token_ids) or token in seq.sampling.stop_token_ids

    def _stop_reason(self, seq: Sequence, token: int, stop_string: bool, num_tokens: int) -> str | None:
        """Why the sequence ends with ``token``, its ``num_tokens``-th token (None: it goes on)."""
        if stop_string or self._is_stop_token(seq, token):
            return "stop"
        if num_tokens >= seq.max_num_tokens:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, out: RequestOutput) -> None:
        """Free (or pin, for ``remote_decode``) the sequence's blocks and complete its final output."""
        pin_blocks = self.block_manager.blocks_for(seq.num_prompt_tokens) if reason == "remote_decode" else 0
        seq.drop_pending()
        pinned = self.scheduler.finish(seq, pin_blocks, keep_blocks=computing_for(seq, self.launched))
        del self.requests[seq.request_id]
        out.finish_reason = reason
        out.num_cached_tokens = seq.num_cached_tokens
        out.pinned_block_ids = pinned or None
        out.usage = Usage(
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_tokens=seq.num_cached_tokens,
        )
        out.timings = seq.timings()

    # ------------------------------------------------------------------ requests' state

    def _new_sequence(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, pin_for_transfer: str | None
    ) -> Sequence:
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            sampling,
            pin_for_transfer=pin_for_transfer,
            generator=None if sampling.seed is None else self.sampler.request_generator(sampling.seed),
            max_num_tokens=min(len(prompt_token_ids) + sampling.max_tokens, self.max_model_len),
        )
        seq.detokenizer = Detokenizer(self.tokenizer, prompt_token_ids, sampling.stop)
        return seq

    def _validate(
        self, request_id: str, prompt: list[int], sampling: SamplingParams, pin_for_transfer: str | None
    ) -> None:
        """Raise ``InvalidRequest`` (naming the parameter) before anything is allocated."""
        in_use = pin_for_transfer is not None and (
            pin_for_transfer in self.block_manager.pins
            or any(s.pin_for_transfer == pin_for_transfer for s in self.requests.values())
        )
        validate_request(request_id, prompt, sampling, self.model_config.vocab_size, self.max_model_len,
                         self.block_manager, running=request_id in self.requests,
                         busy_transfer=pin_for_transfer if in_use else None)
