"""A Triton kernel that fails to build or launch halfway through an answer, as one line.

The probe (kernels/probe.py) catches a GPU where Triton cannot run at all before a model is
loaded; a kernel can still fail later on a GPU and Triton version nobody compiled it for (a
compiler pass that fails, shared memory the launch does not fit). Triton's error then runs to
pages of MLIR. Model.generate and prompt_logits raise it as a KernelFailure instead: one line,
the first of Triton's message, and what to do; Triton's error is its __cause__. qvl-run prints
the same line with its own flag (run_cli.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
LINE_CHARS = 240  # of Triton's first line kept


class KernelFailure(RuntimeError):
    """A Triton kernel failed on this GPU; `line` is the first line of Triton's error."""

    def __init__(self, error: BaseException):
        from ..kernels.probe import first_line

        self.line = first_line(error)[:LINE_CHARS]
        super().__init__(f"a Triton kernel failed on this GPU ({self.line}); a Placement with kernels=False runs "
                         "torch's matmuls on the GPU instead")


def is_tritons(error: BaseException) -> bool:
    """Whether Triton raised `error` compiling or launching a kernel: its type is Triton's, or
    the innermost frame of its traceback is in Triton's package."""
    import triton

    if type(error).__module__.split(".")[0] == "triton":
        return True
    tb, innermost = error.__traceback__, ""
    while tb is not None:
        innermost, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return innermost.startswith(os.path.dirname(triton.__file__) + os.sep)


@contextmanager
def one_line() -> Iterator[None]:
    """Triton's errors in the block raised as a KernelFailure; any other error as it is."""
    try:
        yield
    except (KernelFailure, torch.OutOfMemoryError):  # out of memory: the callers' own handling
        raise
    except Exception as e:
        if not is_tritons(e):
            raise
        raise KernelFailure(e) from e


def one_line_items(items: Iterator[T]) -> Iterator[T]:
    """`items`, with Triton's errors raised as a KernelFailure."""
    with one_line():
        yield from items
