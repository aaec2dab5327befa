"""Which flow a request's choices run: read mode's ``ChoiceRun`` or push mode's ``PushChoiceRun``."""

from __future__ import annotations

from services.gateway.context import FlowContext
from services.gateway.flow import ChoiceRun
from services.gateway.push_flow import PushChoiceRun


def choice_class(context: FlowContext, model: str) -> type[ChoiceRun]:
    """The flow of ``model``'s choices: the gateway's ``--kv-mode``, or with ``auto`` the mode the model's
    engines advertise (a forced mode they do not run fails each disaggregated choice with a 503)."""
    kv_mode = context.config.kv_mode
    if kv_mode == "auto":
        kv_mode = context.router.kv_mode_for(model)
    return PushChoiceRun if kv_mode == "push" else ChoiceRun
