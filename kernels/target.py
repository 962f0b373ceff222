"""The GPU a kernel launches on, as far as its launch parameters care: compute capability and
number of SMs. Launch defaults (tile sizes, warps, pipeline stages, split counts) are picked
from it, so one table per kernel serves every GPU, Triton's interpreter, and cross-compiling
for a GPU that is not here (`pretending`, used by cross_compile.py)."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

from .dot import interpreted


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability x 10 (90: H100); 0: Triton's interpreter on the CPU
    cores: int  # streaming multiprocessors
    # kernels may carry inline PTX: an NVIDIA GPU (not the interpreter, not ROCm's HIP), unless
    # QVL_NO_PTX=1 asks for the plain-Triton code (to rule the assembly out, or compare with it)
    ptx: bool = True

    @property
    def tensor_cores(self) -> bool:
        """Whether Triton (3.9) lowers tl.dot to tensor-core instructions here: from sm_80 on.
        On sm_75 it emits FMA loops (no mma in the PTX), so tiles must be FMA-sized."""
        return self.arch >= 80

    @property
    def hopper(self) -> bool:
        """sm_90 (H100, H200): where the launches measured on an H200 apply (its GEMMs are wgmma
        there). Later GPUs (sm_100, and sm_120's RTX 50xx: mma.sync as on sm_80-89, 99 KB of
        shared memory) keep the general defaults: sm_90's 4-warp Q4_K GEMM spills 64 bytes a
        thread on sm_120 (compile_kernels.py, Triton 3.9), the general 8-warp one none."""
        return 90 <= self.arch < 100


INTERPRETER = Target(0, 1, ptx=False)


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string: "3.10.0+git4f3c" -> (3, 10); parts without digits count 0."""
    major, minor = ([int(m.group()) if (m := re.match(r"\d+", v)) else 0 for v in text.split(".")[:2]] + [0, 0])[:2]
    return major, minor


# Triton 3.3 and later hand a packed inline-assembly op runs of consecutive elements of a row
# where the kernels' layouts make them; Triton 3.2 (torch 2.6's) scattered the packs of 71 GEMV
# launches (compile_kernels.py --arch 90 with it), and assembly that reads a pack as a run
# (qgemv's Q5_0: one qh shift for 4 codes) would compute wrong values. There the plain-Triton
# code runs instead, as with QVL_NO_PTX=1.
PTX_TRITON = _version(triton.__version__) >= (3, 3)
_pretended: list[Target] = []


def target(device: torch.device) -> Target:
    """Where kernels on `device` run: the GPU cross_compile.py (or a test) pretends is there,
    the interpreter, or the CUDA device itself."""
    if _pretended:
        return _pretended[-1]
    if interpreted():
        return INTERPRETER
    if device.type != "cuda":
        raise ValueError(f"Triton kernels need a CUDA device or TRITON_INTERPRET=1, not {device}")
    props = torch.cuda.get_device_properties(device)
    return Target(props.major * 10 + props.minor, props.multi_processor_count,
                  ptx=PTX_TRITON and torch.version.hip is None and os.environ.get("QVL_NO_PTX", "") != "1")


@contextlib.contextmanager
def pretending(gpu: Target) -> Iterator[None]:
    """Within: launch defaults are picked for `gpu`, whatever the tensors' device."""
    _pretended.append(gpu)
    try:
        yield
    finally:
        _pretended.pop()
