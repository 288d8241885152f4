"""Launching the Triton kernels the same way on CUDA and under the interpreter, on every supported torch.

``launchable(kernel)``: a ``triton.jit`` kernel is handed to ``torch.library.wrap_triton``, so
``torch.compile`` sees it inside a ``triton_op``. Under ``TRITON_INTERPRET=1`` ``triton.jit`` returns an
interpreted function instead, which older torch releases' ``wrap_triton`` reject; it launches as it is
(the interpreter only runs in eager mode anyway).

``repair_interpreter()`` (called by ``launchable`` for interpreted kernels): some Triton interpreters turn a
runtime scalar into a Python int with ``int(array_of_one_element)``, which NumPy >= 2.4 rejects ("only
0-dimensional arrays can be converted to Python scalars"), so a loop such as ``tl.range(0, C, BLOCK_C)`` with a
runtime ``C`` fails there. It makes the interpreter read the element instead. Nothing changes outside the
interpreter: the kernels compiled for CUDA never go through this path.
"""

from __future__ import annotations

from typing import Any

from torch.library import wrap_triton

__all__ = ["launchable", "repair_interpreter"]

_repaired = False


def launchable(kernel: Any) -> Any:
    """``kernel`` ready for ``kernel[grid](...)`` inside a ``triton_op``: wrapped for tracing when it is
    compiled, as it is when interpreted."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, (JITFunction, Autotuner)):
        return wrap_triton(kernel)
    repair_interpreter()
    return kernel


def _scalar_index(tensor) -> int:
    return int(tensor.handle.data.reshape(-1)[0])


def repair_interpreter() -> None:
    """Make the interpreter's scalar-to-int conversion read the single element (right with any NumPy);
    a no-op when this Triton's interpreter has no such hook. Idempotent."""
    global _repaired
    if _repaired:
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # a Triton without an interpreter: nothing to repair
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None:  # the patch is undone with the launch's other patches
            scope.set_attr(tensor, "__index__", _scalar_index)
        else:
            tensor.__index__ = _scalar_index

    interpreter._patch_lang_tensor = patch_lang_tensor
    _repaired = True
