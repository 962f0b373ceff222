"""The float type of the CPU's GEMMs: bf16 where the CPU multiplies it natively, float32 elsewhere.

torch's bf16 GEMMs on the CPU use AVX512_BF16 or AMX instructions where the CPU has them, about
twice float32's speed. Without them (x86 with AVX2 only: Intel's client chips, AMD before Zen 4)
bf16 is widened in software: on a 2-core AVX2 EPYC (2026-12-04, torch 2.13, 2 threads) a 2048 x
2048 weight times 512 rows took 262 ms in bf16 against 30 ms in float32 (8.8x), 8.1 against 2.6
ms at 16 rows, and 0.53 against 0.65 ms at one row (bf16 reads half the bytes). So weights kept
as bf16 or 4-bit codes are decoded to float32 tiles for the GEMMs of many rows there (of bf16's
values, x and the products rounded to bf16 too: the numbers of a bf16 GEMM, packed.tiled_product).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

ENV = "QVL_CPU_BF16"  # "1" or "0" overrides the detection (tests; a CPU its flags misjudge)
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo's names


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split())


@functools.cache
def bf16_gemms() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (Linux's CPU flags; elsewhere float32 is assumed)."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def gemm_dtype() -> torch.dtype:
    """bf16 where bf16_gemms(), else float32."""
    return torch.bfloat16 if bf16_gemms() else torch.float32
