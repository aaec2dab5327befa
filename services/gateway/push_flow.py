"""The push-mode flow of one choice (``--kv-mode push``): the decode leg first, then the prefill leg.

Disaggregated choice::

    decode   Generate(prompt, await_push)  -> TokenOutput(push_target, prompt_token_ids)
             ... it waits, its blocks pre-allocated under its own lease ...
    prefill  Generate(prompt_token_ids, do_remote_decode, push_to=push_target)
             -> TokenOutput(first token): prefill wrote the KV into decode's blocks as it computed
             (the first token goes to the client at once; decode gets ``PushDone`` and decodes)
    decode   -> tokens 2.., final usage

Both legs run at once; decode's outputs that arrive before prefill's first token are held back
so the client sees tokens in order.  The prefill leg is retried on another prefill (with the same
registration) like any prefill leg; every prefill output keeps the silent decode leg alive.  A
prefill that ends the request at its first token (a stop, max_tokens 1) aborts the decode leg,
which frees decode's blocks; any other end of the choice aborts both holders (``ChoiceRun._finish``).
"""

from __future__ import annotations

import time

from common.messages import Generate, Instance, TokenOutput
from services.gateway.errors import APIError
from services.gateway.flow import ChoiceRun
from services.gateway.leg import Leg


class PushChoiceRun(ChoiceRun):
    """A choice whose KV prefill pushes into decode's pre-allocated blocks (colocated choices as in read mode)."""

    __slots__ = ("prefill_leg", "held", "decode_ended")
    kv_mode = "push"

    def __init__(self, run, index: int):
        super().__init__(run, index)
        self.prefill_leg: Leg | None = None
        self.held: list[tuple[Instance, TokenOutput]] = []  # decode outputs waiting for prefill's first token
        self.decode_ended = False  # decode's stream ended before prefill's first token came

    def _start_disaggregated(self) -> None:
        gen = Generate(request_id=self.request_id, sampling=self.sampling, await_push=True,
                       **self.prompt.generate_fields())
        self._leg("decode", gen, self._on_decode_push, self._on_decode_end)

    def _finish(self, error: APIError | None, notify: bool = True, abort: bool = False) -> None:
        if not self.done and self.prefill_leg is not None:
            self.prefill_leg.stop()
        super()._finish(error, notify, abort)

    def _on_decode_push(self, inst: Instance, out: TokenOutput) -> None:
        if out.push_target is not None:  # the registration: now the prefill leg
            if out.prompt_token_ids is not None:
                self.prompt_ids = out.prompt_token_ids
            gen = Generate(request_id=self.request_id, sampling=self.sampling, prompt_token_ids=self.prompt_ids,
                           do_remote_decode=True, push_to=out.push_target)
            self.prefill_leg = Leg(self, "prefill", gen, self._on_pushing_prefill, self._on_prefill_end, like=inst)
            self.sent = time.perf_counter()
            self.prefill_leg.start()
        elif self.final is None and self.prefill_leg is not None:
            self.held.append((inst, out))
        else:
            self._on_decode(inst, out)

    def _on_pushing_prefill(self, inst: Instance, out: TokenOutput) -> None:
        if self.leg is not None:
            self.leg.keep_alive()
        self._on_prefill(inst, out)
        if out.finish_reason is not None:
            self.sent, self.first = self.prefill_done, True  # decode's first output is timed from here
            held, self.held = self.held, []
            for decode_inst, decode_out in held:
                self._on_decode(decode_inst, decode_out)

    def _on_prefill_end(self, error: APIError | None) -> None:
        if error is None and self.final is None:
            error = APIError(502, "prefill ended without a final output", code="upstream_error")
        if error is not None:
            self._finish(error)
            return
        assert self.final is not None and self.prefill is not None
        self.holders.pop(self.prefill.id, None)  # it pinned nothing past its final output
        if self.final.finish_reason != "remote_decode":
            self._finish(None, abort=True)  # the first token ended the request: decode's blocks are freed
        elif self.decode_ended:
            self._finish(None)

    def _on_decode_end(self, error: APIError | None) -> None:
        if error is not None:
            self._finish(error)
        elif self.final is None and self.prefill_leg is not None:
            self.decode_ended = True  # prefill's first token is still on its way
        else:
            self._finish(None)
