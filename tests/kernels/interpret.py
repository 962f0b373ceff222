"""Imported first by kernel tests: without a GPU, Triton kernels run in its interpreter on the CPU.

The interpreter patches triton.language for the launch (GridExecutor) and again for every call
of a @triton.jit helper inside it (InterpretedFunction.__call__): `inspect.getmembers` over
the language modules each time, ~1.7 ms a call, most of an interpreted decode step (the GEMV's
step helpers). `_patch_once_per_launch` skips a helper's patch when the launch already patched
the modules the helper sees (its globals' triton.language / triton.language.core); the
patching itself and the launch's restore are Triton's own.
"""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ACCEL = "cuda" if torch.cuda.is_available() else "cpu"  # where kernel tests put their tensors (the accelerator's part)


def _patch_once_per_launch() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "once_per_launch", False):
        return
    patched: set[int] = set()  # the language modules the launch in progress patched
    seen: dict[int, frozenset[int]] = {}  # id(function) -> the language modules its globals hold

    class _Nothing:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        langs = seen.get(id(fn))
        if langs is None:
            langs = seen[id(fn)] = frozenset(id(v) for v in fn.__globals__.values()
                                             if inspect.ismodule(v) and v in (tl, tl.core))
        if patched and langs <= patched:  # a helper inside the launch: the modules are patched
            return _Nothing()
        scope = original(fn)
        if patched:  # a helper seeing other modules: patched as Triton does (its scope never restored)
            patched.update(langs)
            return scope
        patched.update(langs)
        restore = scope.restore

        def restore_launch() -> None:
            patched.clear()
            restore()

        scope.restore = restore_launch
        return scope

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang


def _np_dtype_by_name() -> None:
    """The interpreter's `_get_np_dtype` builds its table of Triton -> numpy dtypes on every call
    (hashing 17 dtypes: ~8 % of an interpreted decode step); here the answer is kept per dtype
    name. The same answers: a block's element type's, uint64 for a pointer, Triton's own table
    for the first of each name."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None or getattr(original, "by_name", False):
        return
    known: dict[str, np.dtype] = {}
    pointer = np.dtype(np.uint64)

    def get_np_dtype(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(element, tl.pointer_type):
            return pointer
        got = known.get(element.name)
        if got is None:
            got = known[element.name] = original(element)
        return got

    get_np_dtype.by_name = True
    interpreter._get_np_dtype = get_np_dtype


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_once_per_launch()
    _np_dtype_by_name()
