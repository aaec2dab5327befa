"""Session set-up shared by every test module: Triton kernels run in Triton's CPU interpreter where there is
no GPU, so the kernel tests run in CI too.

``TRITON_INTERPRET=1`` is set here, before any test module imports ``triton`` (``import torch`` does not),
unless CUDA is available or the variable is already set; ``interpreter_site/`` goes on ``PYTHONPATH`` so that
the processes the tests start patch the interpreter as this one does.  The CPU engine never launches a kernel unless
asked (``--attention-backend auto`` is torch on CPU), so other tests are unaffected.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Every process the tests start (TP worker ranks, engine services) patches Triton's interpreter as this one.
_SITE = Path(__file__).parent / "interpreter_site"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SITE), os.environ.get("PYTHONPATH")) if p)
_spec = importlib.util.spec_from_file_location("pdserve_interpreter_site", _SITE / "sitecustomize.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))  # this process's patch


def pytest_collection_modifyitems(items: list) -> None:
    """Tests marked ``runs_first`` (minutes each, mostly waiting: the docker compose image build) go first: under
    ``make test``'s two workers one of them builds while the other runs the rest, instead of the build running
    alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("runs_first") is None)  # stable: the rest keep their order
