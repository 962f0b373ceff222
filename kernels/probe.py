"""Whether Triton's kernels run on a device at all: one tiny kernel, tried before a model is
loaded onto the GPU.

On first use Triton builds a small C launcher with the machine's C compiler and assembles its
PTX with the ptxas it ships. A machine without a C compiler, a GPU newer than the installed
Triton knows (its ptxas refuses the architecture), or a driver older than that ptxas fails
there, at the first kernel of the first prompt, with a compiler's error. qvl-run and qvl.load
try this kernel first and, where it fails, run torch's matmuls on the GPU with a warning that
says why (as --no-triton) instead of a traceback halfway through an answer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_checked: dict[str, str | None] = {}  # device -> failure(device): tried once a process (qvl-run, then load)
MIN_CAPABILITY = (7, 0)  # Triton compiles for Volta and later; Pascal and older run the torch path
N = 5  # values the probe writes: fewer than its block, so the mask is exercised too


@triton.jit
def _probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask, other=0.0) * 2.0 + 1.0, mask=mask)


def _launch(x: torch.Tensor, y: torch.Tensor) -> None:
    _probe_kernel[(1,)](x, y, N, BLOCK=8)


def first_line(error: BaseException) -> str:
    """An error's type and the first non-blank line of its message (Triton's can run to pages)."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "no message")
    return f"{type(error).__name__}: {line}"


def failure(device: torch.device) -> str | None:
    """None where the probe kernel runs on `device` and computes 2x + 1; otherwise why not, in
    one line (the first line of the error)."""
    try:
        x = torch.arange(N, dtype=torch.float32, device=device)
        y = torch.full((N,), -1.0, device=device)
        _launch(x, y)
        right = torch.equal(y.cpu(), torch.arange(N, dtype=torch.float32) * 2 + 1)
    except Exception as e:  # any failure to build, load or launch is a reason not to use the kernels
        return first_line(e)[:240]
    return None if right else "a test kernel computed wrong values"


def why_not(device: torch.device) -> str | None:
    """None where qvl's kernels can run on the CUDA GPU `device`; otherwise one line saying why
    not (a GPU older than Triton supports, or the probe kernel's failure), for a warning. The
    kernel is tried once a process and device: qvl-run asks before it loads, and load again."""
    name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return (f"{name} (compute capability {major}.{minor}) is older than Triton supports "
                f"({MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]})")
    key = str(device)
    if key not in _checked:
        _checked[key] = failure(device)
    why = _checked[key]
    return None if why is None else f"the Triton kernels do not run on {name} ({why})"
