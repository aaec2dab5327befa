"""What ``LLMEngine`` checks of a request before it allocates anything for it."""

from __future__ import annotations

from common.engine.block_manager import BlockManager
from common.engine.sequence import InvalidRequest
from common.messages import MAX_LOGPROBS, SamplingParams


def validate_request(
    request_id: str,
    prompt: list[int],
    sampling: SamplingParams,
    vocab: int,
    max_model_len: int,
    block_manager: BlockManager,
    *,
    running: bool,
    busy_transfer: str | None,
) -> None:
    """Raise ``InvalidRequest`` naming the first bad parameter (``running``: the id is taken;
    ``busy_transfer``: its transfer id, which another request holds)."""

    def check(ok: bool, param: str, message: str) -> None:
        if not ok:
            raise InvalidRequest(f"request {request_id!r}: {message}", param)

    check(not running, "request_id", "a request with this id is already running")
    check(len(prompt) > 0, "prompt", "the prompt is empty")
    check(min(prompt) >= 0 and max(prompt) < vocab, "prompt_token_ids", f"token ids must be in [0, {vocab})")
    check(sampling.max_tokens >= 1, "max_tokens", f"max_tokens must be >= 1, got {sampling.max_tokens}")
    check(sampling.temperature >= 0, "temperature", f"temperature must be >= 0, got {sampling.temperature}")
    check(0 < sampling.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {sampling.top_p}")
    check(sampling.top_k >= 0, "top_k", f"top_k must be >= 0 (0 = disabled), got {sampling.top_k}")
    check(
        sampling.logprobs is None or 0 <= sampling.logprobs <= MAX_LOGPROBS,
        "logprobs",
        f"logprobs must be in [0, {MAX_LOGPROBS}], got {sampling.logprobs}",
    )
    check(all(0 <= t < vocab for t in sampling.stop_token_ids), "stop_token_ids", f"ids must be in [0, {vocab})")
    check(
        len(prompt) < max_model_len, "prompt", f"the prompt has {len(prompt)} tokens; max_model_len is {max_model_len}"
    )
    check(
        len(prompt) + sampling.max_tokens <= max_model_len,
        "max_tokens",
        f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_tokens}) = "
        f"{len(prompt) + sampling.max_tokens} exceeds max_model_len {max_model_len}",
    )
    need = block_manager.blocks_for(len(prompt) + sampling.max_tokens)
    check(
        need <= block_manager.num_blocks,
        "max_tokens",
        f"prompt + max_tokens need {need} KV blocks; the cache has {block_manager.num_blocks}",
    )
    check(busy_transfer is None, "transfer_id", f"transfer id {busy_transfer!r} is already in use")
