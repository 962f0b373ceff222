"""The interpreter's patches (interpret.py) keep Triton's results and its errors: a kernel that
broadcasts, mixes same-shape blocks and does int32 index arithmetic gives numpy's answer; a bad
block shape is refused after good ones were kept; in debug mode an int32 overflow is still caught.
"""

from __future__ import annotations

import dataclasses
import os

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the patches are to Triton's interpreter, which a GPU run does not use")


@triton.jit
def _mix(x_ptr, y_ptr, out_ptr, scale, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, COLS)[None, :]
    x = tl.load(x_ptr + rows * COLS + cols)  # [ROWS, COLS]
    y = tl.load(y_ptr + cols)  # [1, COLS], broadcast against x
    index = (rows * COLS + cols) * scale  # int32
    tl.store(out_ptr + rows * COLS + cols, x * y + x + index.to(tl.float32))


def _launch(scale: int, rows: int = 4, cols: int = 8) -> torch.Tensor:
    x = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) / 7
    y = torch.linspace(-1, 1, cols)
    out = torch.empty_like(x)
    _mix[(1,)](x, y, out, scale, ROWS=rows, COLS=cols)
    index = (np.arange(rows * cols, dtype=np.int64).reshape(rows, cols) * scale).astype(np.int32)  # wraps
    expected = x.numpy() * y.numpy()[None, :] + x.numpy() + index.astype(np.float32)
    np.testing.assert_array_equal(out.numpy(), expected)
    return out


@pytest.mark.parametrize("rows,cols", [(4, 8), (1, 16), (8, 1), (4, 8)])  # (4, 8) again: its shapes kept
def test_broadcasts_and_int32_arithmetic_give_numpys_answer(rows, cols):
    _launch(3, rows, cols)


def test_a_bad_block_shape_is_refused_after_good_ones_were_kept():
    tl.block_type(tl.float32, [4, 8])
    assert str(tl.block_type(tl.float32, [4, 8]).shape) == str(tl.block_type(tl.int32, [4, 8]).shape)
    with pytest.raises(ValueError, match="power of 2"):
        tl.block_type(tl.float32, [4, 6])
    with pytest.raises(TypeError, match="0d block_type"):
        tl.block_type(tl.float32, [])


@pytest.fixture
def debug_interpreter():
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    interpreter.interpreter_builder.options = dataclasses.replace(options, debug=True)
    yield
    interpreter.interpreter_builder.options = options


def test_an_int32_overflow_wraps_without_debug_and_is_caught_with_it(request):
    _launch(1 << 27)  # index up to 31 << 27: wraps past 2^31, as on a GPU
    request.getfixturevalue("debug_interpreter")
    with pytest.raises(InterpreterError, match="int32 overflow detected for operation mul"):
        _launch(1 << 27)
    _launch(3)  # no overflow: no error in debug mode either
