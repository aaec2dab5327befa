"""Which instance serves a leg: membership view, mode, and per-role policies.

An instance serves exactly its registered role (``common.roles.serves``): a ``both``
instance takes colocated requests only, never a prefill or decode leg.

The membership is the registry watcher's ``instances`` mapping (expired and
deregistered instances leave it); ``changed()`` must be called after every
change of it (it is the watcher's listener), then the next pick sees it.  Prefill and decode
each have their own policy object, so their choices are never locked together.

* ``round_robin``: rotate over the candidates (sorted by id), one counter per role.
* ``least_loaded``: fewest waiting requests (heartbeat ``load.waiting`` plus legs
  this gateway sent there since, so a burst between heartbeats spreads out),
  then most free KV blocks, ties rotated.

Conditional disaggregation (``prefill_on_decode``, as Dynamo's disaggregated router does it): while every
prefill instance of a model is busy with ``--local-prefill-queue`` prefill legs from this gateway, a new
request computes its prompt on a decode instance in one leg (no KV transfer), so a burst that would queue
behind one prefill engine uses the decode engines' idle compute; ``local_prefills`` counts those prompts
until their first token.

An instance that failed a leg is skipped for ``failure_cooldown_s`` unless no
other candidate is left; the first failure of an episode (until a leg on it
succeeds) is logged at warning with its error.  A decode instance is only paired with a prefill
instance of the same model whose KV it can read (``common.kv_compat.kv_incompatibilities``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from typing import Iterable, Literal, Mapping, get_args

from common.errors import CallTimeout
from common.kv_compat import kv_incompatibilities
from common.messages import Instance, KVMode, Role
from common.roles import serves
from services.gateway.errors import APIError, invalid, no_instance

log = logging.getLogger(__name__)

ServingMode = Literal["disagg", "colocated"]  # P/D legs (prefill then decode), or one leg on a `both` instance
ROLES: tuple[Role, ...] = get_args(Role)


class RoundRobin:
    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, candidates: list[Instance], outstanding: Counter) -> Instance:
        return candidates[next(self._next) % len(candidates)]


class LeastLoaded:
    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, candidates: list[Instance], outstanding: Counter) -> Instance:
        def key(inst: Instance) -> tuple[int, int]:
            free = inst.load.kv_blocks_total - inst.load.kv_blocks_used
            return inst.load.waiting + outstanding[inst.id], -free

        best = min(map(key, candidates))
        tied = [c for c in candidates if key(c) == best]
        return tied[next(self._next) % len(tied)]


POLICIES = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}


class Router:
    def __init__(self, instances: Mapping[str, Instance], *, mode: str = "auto",
                 prefill_policy: str = "least_loaded", decode_policy: str = "least_loaded",
                 failure_cooldown_s: float = 5.0):
        self.instances = instances
        self.mode = mode
        self.policies = {"prefill": POLICIES[prefill_policy](), "decode": POLICIES[decode_policy](),
                         "both": POLICIES[prefill_policy]()}
        self.failure_cooldown_s = failure_cooldown_s
        self.outstanding: Counter = Counter()  # legs sent and not yet finished, per instance id
        self.local_prefills: Counter = Counter()  # per model: prompts computing on decode instances, before their first token
        self._failed_until: dict[str, float] = {}
        self._failing: set[str] = set()  # instances in a failure episode (logged once, at its start)
        self._groups: dict[tuple[str, str], list[Instance]] | None = None  # (role, model) -> sorted by id
        self._models: list[str] | None = None
        self._max_model_len: dict[str, int] = {}
        self._modes: dict[str, ServingMode] = {}  # mode_for's answers (not its errors) since the last change
        self._kv_modes: dict[str, KVMode] = {}

    def changed(self, change: str, inst: Instance) -> None:
        """The membership mapping changed (a watcher listener): drop derived state."""
        self._groups = None
        self._models = None
        self._max_model_len = {}
        self._modes = {}
        self._kv_modes = {}
        if change in ("left", "expired"):
            self._failed_until.pop(inst.id, None)
            self._failing.discard(inst.id)

    def _of(self, role: Role, model: str) -> list[Instance]:
        """The instances of ``model`` that serve ``role`` (``common.roles.serves``), sorted by id."""
        if self._groups is None:
            groups: dict[tuple[str, str], list[Instance]] = {}
            for i in sorted(self.instances.values(), key=lambda i: i.id):
                for served in ROLES:
                    if serves(i, served):
                        groups.setdefault((served, i.model), []).append(i)
            self._groups = groups
        return self._groups.get((role, model), [])

    def models(self) -> list[str]:
        if self._models is None:
            self._models = sorted({i.model for i in self.instances.values()})
        return self._models

    def served(self, model: str | None) -> str:
        """``model`` if some instance serves it, or with None the one model served; else the error vLLM
        answers: 404 for a model not served, 400 for None among several, 503 when none is registered."""
        models = self.models()
        if not models:
            raise no_instance("no instance is registered")
        if model is None:
            if len(models) > 1:
                raise invalid(f"'model' is required: several are served ({', '.join(models)})", "model",
                              "missing_required_parameter")
            return models[0]
        if model not in models:
            raise APIError(404, f"The model `{model}` does not exist; served: {', '.join(models)}",
                           param="model", code="model_not_found")
        return model

    def of_model(self, model: str) -> list[Instance]:
        """Every instance of ``model``, fewest legs outstanding here first."""
        return sorted((i for i in self.instances.values() if i.model == model),
                      key=lambda i: (self.outstanding[i.id], i.id))

    def max_model_len(self, model: str) -> int:
        """The smallest context length among the model's instances (0 when none)."""
        length = self._max_model_len.get(model)
        if length is None:
            length = self._max_model_len[model] = min(
                (i.capacity.max_model_len for i in self.instances.values() if i.model == model), default=0)
        return length

    def mode_for(self, model: str) -> ServingMode:
        """How ``model`` is served now; raises 503 when the needed roles are missing."""
        mode = self._modes.get(model)
        if mode is None:
            mode = self._modes[model] = self._mode_for(model)
        return mode

    def _mode_for(self, model: str) -> ServingMode:
        if self.mode in ("auto", "disagg"):
            if self._of("prefill", model) and self._of("decode", model):
                return "disagg"
            if self.mode == "disagg":
                raise no_instance(f"no prefill and decode instance available for model {model!r}: need both roles")
        if self._of("both", model):
            return "colocated"
        raise no_instance(f"no {'colocated (role both)' if self.mode == 'colocated' else 'serving'} "
                          f"instance available for model {model!r}")

    def prefill_on_decode(self, model: str, queue: int) -> bool:
        """Whether a new disaggregated request of ``model`` should compute its prompt on a decode instance:
        ``queue`` > 0, every prefill instance has at least ``queue`` legs in flight from here, and the decode
        instances fewer than ``queue`` such prompts each."""
        if queue <= 0:
            return False
        prefills, decodes = self._of("prefill", model), self._of("decode", model)
        return (bool(prefills) and all(self.outstanding[i.id] >= queue for i in prefills)
                and self.local_prefills[model] < queue * len(decodes))

    def local_prefill_started(self, model: str) -> None:
        """A request of ``model`` computes its prompt on a decode instance (``prefill_on_decode`` said so)."""
        self.local_prefills[model] += 1

    def local_prefill_done(self, model: str) -> None:
        """That prompt is computed (its first token), or its request ended."""
        self.local_prefills[model] -= 1

    def kv_mode_for(self, model: str) -> KVMode:
        """How ``model``'s prefill and decode instances move KV (the registry admits one mode per model;
        ``read`` when none is registered)."""
        kv_mode = self._kv_modes.get(model)
        if kv_mode is None:
            group = self._of("decode", model) or self._of("prefill", model)
            kv_mode = self._kv_modes[model] = group[0].kv_mode if group else "read"
        return kv_mode

    def ready(self) -> bool:
        """Some model has what the mode needs."""
        for model in self.models():
            try:
                self.mode_for(model)
                return True
            except APIError:
                pass
        return False

    def pick(self, role: Role, model: str, *, exclude: Iterable[str] = (),
             like: Instance | None = None) -> Instance | None:
        """An instance for a leg, or None; ``like`` (the leg's prefill instance): only instances that
        can read its KV."""
        candidates = self._of(role, model)
        if exclude or like is not None:
            excluded = set(exclude)
            candidates = [i for i in candidates
                          if i.id not in excluded and (like is None or not kv_incompatibilities(like.fingerprint,
                                                                                               i.fingerprint))]
        if len(candidates) > 1:
            if self._failed_until:
                now = time.monotonic()
                candidates = [i for i in candidates if self._failed_until.get(i.id, 0.0) <= now] or candidates
            chosen = self.policies[role].choose(candidates, self.outstanding)
        elif candidates:
            chosen = candidates[0]  # the only one, whatever the policy or its health
        else:
            return None
        self.outstanding[chosen.id] += 1
        return chosen

    def done(self, inst: Instance) -> None:
        """A leg picked on ``inst`` ended."""
        self.outstanding[inst.id] -= 1
        if self.outstanding[inst.id] <= 0:
            del self.outstanding[inst.id]

    def mark_failed(self, inst: Instance, error: Exception) -> None:
        """A leg on ``inst`` failed with ``error``: skip it for the cooldown; the first failure of an
        episode (until a leg on it succeeds, or it leaves) is logged with its error."""
        if inst.id not in self._failing:
            self._failing.add(inst.id)
            hint = (f" (is {inst.request_endpoint} reachable from this gateway?)"
                    if isinstance(error, CallTimeout) else "")
            log.warning("%s instance %s failed: %s%s; skipped for %g s while others serve", inst.role, inst.id,
                        error, hint, self.failure_cooldown_s)
        self._failed_until[inst.id] = time.monotonic() + self.failure_cooldown_s

    def succeeded(self, inst: Instance) -> None:
        """A leg on ``inst`` ended well: its failure episode, if any, is over."""
        if inst.id in self._failing:
            self._failing.discard(inst.id)
            log.info("%s instance %s serves again", inst.role, inst.id)
