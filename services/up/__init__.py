"""``pdserve up``: the whole stack on this machine, as child processes.

Refuses a gateway port already in use, then starts the registry (on a free
port unless ``--registry-port``; with ``--registry-backend etcd`` a one-member
etcd with its data in a temporary directory, in its place), the engine instances (``--prefill N`` prefill
and ``--decode M`` decode, or ``--colocated K`` instances of role ``both`` with
``--mode colocated``), each under an instance id this run generated, and the
gateway; waits until the gateway lists every one of those ids; prints the URL
and a ``curl`` to paste.  Each child's output line is copied to stderr after its
name (``[prefill-0] ...``).  On SIGINT/SIGTERM it stops them in
order — gateway (no new requests), engines (finish or abort in-flight work,
release KV, deregister), registry — each within ``--shutdown-timeout-s``,
then SIGKILL.  A child that dies unexpectedly is restarted with the same
flags (at most ``--max-restarts`` times per child), as a supervisor would:
engines re-register, the gateway and engines find a restarted registry again.
With ``--gpus``, each engine gets as many GPUs as its tensor-parallel size
(``engine_gpus``) through ``CUDA_VISIBLE_DEVICES``.
Children run in their own session (a terminal's Ctrl-C reaches
only this process, which orders the shutdown) and die with this process
(PR_SET_PDEATHSIG), so no orphan outlives it.

``config.py``: the flags and what each child runs with; ``children.py``: one
child process; ``stack.py``: the stack, its readiness and its stop.
"""

from services.up.config import UpConfig, assign_gpus, parse_engine_flags, tensor_parallel_size
from services.up.stack import Stack, serve

__all__ = ["Stack", "UpConfig", "assign_gpus", "parse_engine_flags", "serve", "tensor_parallel_size"]
