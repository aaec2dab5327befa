"""The one KV compatibility rule: can a decode engine read a prefill engine's KV blocks?

Used by the registry at ``Register``, the prefill's side channel at ``Handshake``, the reader on
the ``HandshakeReply``, and the gateway when it picks a decode after a prefill.
"""

from __future__ import annotations

from common.messages import Fingerprint


def kv_incompatibilities(prefill: Fingerprint, decode: Fingerprint) -> dict[str, str]:
    """Why ``decode`` cannot read ``prefill``'s KV blocks: field name -> reason; empty when it can.

    Every fingerprint field must match, except two that may differ within what the reader
    implements: the block sizes when both are powers of two (it maps token positions), and the
    tensor-parallel sizes when one divides the other (each decode rank reads the KV heads it owns
    from the prefill ranks holding them): ``common.kv_transfer.read_plan``.
    """
    if prefill == decode:  # the usual case, asked once per decode candidate on every request
        return {}
    reasons = {}
    for field in prefill.differences(decode):
        at_prefill, at_decode = getattr(prefill, field), getattr(decode, field)
        if field == "block_size":
            if not (_is_power_of_two(at_prefill) and _is_power_of_two(at_decode)):
                reasons[field] = (f"block_size: prefill {at_prefill} and decode {at_decode} differ and are not both "
                                  "powers of two")
        elif field == "tensor_parallel_size":
            if max(at_prefill, at_decode) % min(at_prefill, at_decode):
                reasons[field] = f"prefill TP {at_prefill} and decode TP {at_decode}: neither divides the other"
        else:
            reasons[field] = f"{field}: prefill {at_prefill!r}, decode {at_decode!r}"
    return reasons


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
