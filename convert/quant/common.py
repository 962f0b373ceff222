"""Scalar semantics of ggml-quants.c, vectorized over blocks.

ggml's reference quantizers are sequential float32 C code. To reproduce their bytes we keep
every intermediate in float32, evaluate expressions in the same order, and accumulate sums
element by element (never numpy's pairwise `sum`, whose rounding differs). Arrays are laid out
element-major, `(n_elements_per_group, n_groups)`, so that a sequential accumulation is a short
Python loop of whole-array operations.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32

# Bias of ggml's `nearest_int`: 1.5 * 2**23. Adding it pushes the rounded integer into the low
# mantissa bits of a float32.
MAGIC = F32(12582912.0)

# ggml-quants.c: GROUP_MAX_EPS
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: round half to even through the float32 magic-number trick.

    Bit-exact with the C code for every input, including values beyond 2**22 where the C
    function returns garbage (its assert is compiled out in release builds).
    """
    biased = (np.asarray(v, dtype=F32) + MAGIC).astype(F32)
    bits = biased.view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def roundf(v: np.ndarray) -> np.ndarray:
    """C `roundf`: round half away from zero, exact in float32 (no `x + 0.5` error)."""
    t = np.trunc(v)
    frac = v - t  # exact for float32
    return t + np.where(np.abs(frac) >= F32(0.5), np.sign(v), F32(0)).astype(F32)


def to_f16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even) as little-endian uint16."""
    return np.asarray(v, dtype=F32).astype(np.float16).view(np.uint16)


def f16_round(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))."""
    return np.asarray(v, dtype=F32).astype(np.float16).astype(F32)


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sequential float32 sum along axis 0, as a C `for` loop with `s += t[i]` does it."""
    acc = terms[0].copy()
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def u16_bytes(v: np.ndarray) -> np.ndarray:
    """Little-endian bytes of a uint16 vector, shape (n, 2)."""
    return np.ascontiguousarray(v.astype("<u2")).view(np.uint8).reshape(-1, 2)


def u32_bytes(v: np.ndarray) -> np.ndarray:
    """Little-endian bytes of a uint32 vector, shape (n, 4)."""
    return np.ascontiguousarray(v.astype("<u4")).view(np.uint8).reshape(-1, 4)
