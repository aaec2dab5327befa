"""Fake engine instances that speak the real engine protocol over the real bus.

They stand in for the prefill/decode/both engine services where a model is
beside the point (gateway tests, the gateway overhead benchmark), built from
the production parts with only the model and the KV transport faked:

* ``model``: the deterministic fake model (``token_at``, ``logprob_of``) and its byte tokenizer;
* ``transport``: ``FakeTransport``, a ``TransferBackend`` that moves nothing;
* ``prefill_kv``: ``FakePrefillKV``, a fake prefill's pinned blocks under the real handoff and side channel;
* ``engine``: ``FakeEngine``, one instance of a role, and ``FaultPlan``;
* ``cluster``: ``run_fakes`` and ``FakeCluster`` (registry + fakes + gateway in one loop).

``python -m bench.fakes --registry tcp://...`` runs instant fakes as a process.
"""

from bench.fakes.cluster import FakeCluster, run_fakes
from bench.fakes.engine import FakeEngine, FaultPlan, fingerprint
from bench.fakes.model import ALPHABET, logprob_of, token_at

__all__ = ["ALPHABET", "FakeCluster", "FakeEngine", "FaultPlan", "fingerprint", "logprob_of", "run_fakes", "token_at"]
