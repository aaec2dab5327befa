"""Session set-up shared by every test module: Triton kernels run in Triton's CPU interpreter where there is
no GPU, so the kernel tests run in CI too.

``TRITON_INTERPRET=1`` is set here, before any test module imports ``triton`` (``import torch`` does not),
unless CUDA is available or the variable is already set.  The CPU engine never launches a kernel unless
asked (``--attention-backend auto`` is torch on CPU), so other tests are unaffected.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a loaded scalar into a Python int with ``int(array of shape (1,))``,
    which NumPy >= 2.4 refuses (triton-lang/triton#9171): loops bounded by a loaded length need ``.item()``."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _interpreter_loop_bounds()
