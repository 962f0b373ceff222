"""Imported first by kernel tests: without a GPU, Triton kernels run in its interpreter on the CPU.

The interpreter runs every program of a launch in Python, one operation at a time, and most of
an interpreted step goes to Triton's bookkeeping around each operation rather than to numpy.
Four patches here cut that bookkeeping without changing what a kernel computes or which errors
Triton raises (each one's docstring says why; each is applied once, and only where Triton's
code has the shape read here):
- `_patch_once_per_launch`: triton.language patched once per launch, not per @jit helper call;
- `_np_dtype_by_name`: the Triton -> numpy dtype table looked up per dtype name;
- `_shapes_kept`: a block type's and a tensor's shape objects built once per shape;
- `_no_unused_overflow_checks`: no int32 overflow checks built for a `device_assert` that drops them.
"""

import inspect
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ACCEL = "cuda" if torch.cuda.is_available() else "cpu"  # where kernel tests put their tensors (the accelerator's part)


def _patch_once_per_launch() -> None:
    """The interpreter patches triton.language for the launch (GridExecutor) and again for every
    call of a @triton.jit helper inside it (InterpretedFunction.__call__): `inspect.getmembers`
    over the language modules each time, ~1.7 ms a call, most of an interpreted decode step (the
    GEMV's step helpers). Here a helper's patch is skipped when the launch already patched the
    modules the helper sees (its globals' triton.language / triton.language.core); the patching
    itself and the launch's restore are Triton's own."""
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


def _shapes_kept() -> None:
    """Every value the interpreter makes is a `tl.tensor`, most of a `tl.block_type`, and both
    rebuild their shape on each construction: the block type a `tl.tuple` of its unwrapped,
    validated ints (with a `tuple_type`) and its name, the tensor a `tl.tuple` of `constexpr`s
    (an interpreted model test's call took 20.3 s with them, 13.4 s without). Here a block type
    whose shape is whole ints that Triton validated before shares that shape's objects: the same
    values Triton's own constructor built the first time, kept per shape; anything else goes
    through Triton's code."""
    import builtins
    import math

    import triton.language.core as core

    try:
        from triton.language.semantic import TritonSemantic  # Triton 3.4 and later
    except ImportError:
        return
    if getattr(core.tensor.__init__, "shapes_kept", False) or not isinstance(getattr(core, "tuple", None), type):
        return
    block_init = core.block_type.__init__
    block_shapes: dict[tuple, tuple] = {}  # ints -> (the block type's tl.tuple, numel), as Triton built them
    block_names: dict[tuple, str] = {}  # (element type's name, ints) -> the block type's name
    tensor_shapes: dict[int, tuple] = {}  # id(a kept tl.tuple) -> (the tensor's tl.tuple of constexprs, numel)

    def tensor_shape(shape) -> tuple:
        return core.tuple([core.constexpr(s) for s in shape]), core.constexpr(math.prod(shape))

    scalar = tensor_shape(())

    def block_type_init(self, element_ty, shape):
        ints = shape.values if type(shape) is core.tuple else shape
        key = builtins.tuple(ints) if isinstance(ints, (list, builtins.tuple)) else None
        kept = block_shapes.get(key) if key and all(type(s) is int for s in key) else None
        if kept is None:
            block_init(self, element_ty, shape)
            if key and list(self.shape) == list(key):
                block_shapes[key] = (self.shape, self.numel)
                tensor_shapes[id(self.shape)] = tensor_shape(self.shape)
            return
        self.element_ty = element_ty
        self.shape, self.numel = kept
        name = block_names.get((element_ty.name, key))
        if name is None:
            name = block_names[(element_ty.name, key)] = f"<{self.shape}, {element_ty}>"  # Triton's form
        self.name = name

    def tensor_init(self, handle, type):
        self.handle = handle
        self.type = type
        self.dtype = type.scalar
        if type.is_block():
            kept = tensor_shapes.get(id(type.shape))
            self.shape, self.numel = kept if kept is not None else tensor_shape(type.shape)
        else:
            self.shape, self.numel = scalar

    broadcast = TritonSemantic.broadcast_impl_value

    def broadcast_impl_value(self, lhs, rhs):
        """Two blocks of one kept shape: Triton's own code returns them as they are."""
        lhs_ty, rhs_ty = lhs.type, rhs.type
        if lhs_ty.is_block() and rhs_ty.is_block() and lhs_ty.shape is rhs_ty.shape and id(lhs_ty.shape) in tensor_shapes:
            return lhs, rhs
        return broadcast(self, lhs, rhs)

    block_type_init(object.__new__(core.block_type), core.float32, [4, 8])  # Triton's own, then kept
    sample = [(core.block_type, block_init, block_type_init, (core.float32, [4, 8])),
              (core.tensor, core.tensor.__init__, tensor_init, (None, core.block_type(core.float32, [4, 8]))),
              (core.tensor, core.tensor.__init__, tensor_init, (None, core.float32))]
    if not all(_builds_the_same(*case) for case in sample):  # another Triton's fields: its own code
        return
    tensor_init.shapes_kept = True
    core.tensor.__init__ = tensor_init
    core.block_type.__init__ = block_type_init
    TritonSemantic.broadcast_impl_value = broadcast_impl_value


def _builds_the_same(cls: type, original, patched, args: tuple) -> bool:
    """Both constructors give an object of the same fields, of the same types and text."""
    ours, theirs = object.__new__(cls), object.__new__(cls)
    original(theirs, *args)
    patched(ours, *args)
    return vars(ours).keys() == vars(theirs).keys() and all(
        type(value) is type(vars(theirs)[key]) and str(value) == str(vars(theirs)[key])
        for key, value in vars(ours).items())


def _no_unused_overflow_checks() -> None:
    """Triton's `+`, `-` and `*` on int32 values build an overflow check (both sides cast to
    int64, the operation again, two comparisons) for `device_assert`, which drops it unless the
    launch is in debug mode; the interpreter built it anyway for every integer operation (the
    model test of `_shapes_kept`: 13.4 s with it, 10.2 s without). Here it is built only where
    `device_assert` would use it."""
    try:
        from triton.language.semantic import TritonSemantic  # Triton 3.4 and later
    except ImportError:
        return
    sanitize = getattr(TritonSemantic, "binary_op_sanitize_overflow_impl", None)
    if sanitize is None or getattr(sanitize, "debug_only", False):
        return

    def binary_op_sanitize_overflow_impl(self, lhs, rhs, binary_op):
        if self.builder.options.debug:
            sanitize(self, lhs, rhs, binary_op)

    binary_op_sanitize_overflow_impl.debug_only = True
    TritonSemantic.binary_op_sanitize_overflow_impl = binary_op_sanitize_overflow_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_once_per_launch()
    _np_dtype_by_name()
    _shapes_kept()
    _no_unused_overflow_checks()
