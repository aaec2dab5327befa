"""Which instance serves which work: one rule, used by the registry and the gateway's router.

An instance serves exactly the work its role names, nothing else:

* ``prefill``: the prefill leg of a P/D request (``Generate(do_remote_decode)``);
* ``decode``: the decode leg (``Generate(remote_prefill=...)``);
* ``both``: a whole request, colocated (no KV transfer).

A ``both`` instance is never handed a P/D leg: it registers no transfer memory,
so no decode engine could read its KV, and its engine refuses both leg kinds.
"""

from __future__ import annotations

from common.messages import Instance, Role


def serves(instance: Instance, role: Role | None) -> bool:
    """Whether ``instance`` takes ``role`` work; ``None`` asks for every instance."""
    return role is None or instance.role == role
