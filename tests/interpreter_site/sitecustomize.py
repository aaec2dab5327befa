"""Imported at start-up by every Python process the tests start (``tests/conftest.py`` puts this directory on
``PYTHONPATH``): the tensor-parallel worker ranks and engine services interpret Triton kernels as the test
process does.

Triton 3.6's interpreter turns a loaded scalar into a Python int with ``int(array of shape (1,))``, which
NumPy >= 2.4 refuses (triton-lang/triton#9171): loops bounded by a loaded length need ``.item()``.
"""

from __future__ import annotations

import importlib.util
import os


def interpreter_loop_bounds() -> None:
    """Patch the interpreter's tensors to convert a loaded scalar with ``.item()``."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    interpreter_loop_bounds()
