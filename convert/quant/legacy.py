"""ggml's 32-element block quantizers: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Ports of `quantize_row_*_ref` in ggml-quants.c. Each function takes float32 blocks of shape
`(n_blocks, 32)` and returns the raw block bytes, shape `(n_blocks, block_bytes)`.

    Q8_0 (34 B):  f16 d | int8 qs[32]                      x = d * q
    Q4_0 (18 B):  f16 d | u8 qs[16]                        x = d * (q - 8)
    Q4_1 (20 B):  f16 d | f16 m | u8 qs[16]                x = d * q + m
    Q5_0 (22 B):  f16 d | u32 qh | u8 qs[16]               x = d * (q - 16)
    Q5_1 (24 B):  f16 d | f16 m | u32 qh | u8 qs[16]       x = d * q + m
In the 4/5-bit types byte j holds element j in its low nibble and element j + 16 in its high
nibble; bit j of qh is the fifth bit of element j.
"""

from __future__ import annotations

import numpy as np

from .common import F32, roundf, to_f16_bits, u16_bytes, u32_bytes
from .k_minmax import make_qkx2_quants
from .q6_k import make_qx_quants_rmse1


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The first element of largest magnitude per block (`if (amax < fabsf(v))`), +0 for zeros."""
    idx = np.argmax(np.abs(x), axis=1)
    mx = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    return np.where(mx == 0, F32(0.0), mx).astype(F32)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return ((lo & 0x0F) | ((hi & 0x0F) << 4)).astype(np.uint8)


def _fifth_bits(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    bits = np.concatenate([(lo >> 4) & 1, (hi >> 4) & 1], axis=1).astype(np.uint64)
    return (bits << np.arange(32, dtype=np.uint64)).sum(axis=1).astype(np.uint32)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    d = (amax / F32(127)).astype(F32)
    q = roundf(x * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([u16_bytes(to_f16_bits(d)), q.view(np.uint8)], axis=1)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d = (_signed_absmax(x) / F32(-8)).astype(F32)
    xs = x * _inverse(d)[:, None]
    q = np.minimum(15, np.trunc(xs + F32(8.5)).astype(np.int32))
    return np.concatenate([u16_bytes(to_f16_bits(d)), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d = (_signed_absmax(x) / F32(-16)).astype(F32)
    xs = x * _inverse(d)[:, None]
    q = np.minimum(31, np.trunc(xs + F32(16.5)).astype(np.int32))
    lo, hi = q[:, :16], q[:, 16:]
    return np.concatenate(
        [u16_bytes(to_f16_bits(d)), u32_bytes(_fifth_bits(lo, hi)), _nibbles(lo, hi)], axis=1
    )


def _min_max_scale(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    # `if (v < min) min = v` keeps the first of equal minima: the sign of a zero min matters.
    mn = np.take_along_axis(x, np.argmin(x, axis=1)[:, None], axis=1)[:, 0]
    mx = np.take_along_axis(x, np.argmax(x, axis=1)[:, None], axis=1)[:, 0]
    d = ((mx - mn) / F32(levels)).astype(F32)
    return mn, d


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    mn, d = _min_max_scale(x, 15)
    xs = (x - mn[:, None]) * _inverse(d)[:, None]
    q = np.minimum(15, np.trunc(xs + F32(0.5)).astype(np.int32))
    head = np.concatenate([u16_bytes(to_f16_bits(d)), u16_bytes(to_f16_bits(mn))], axis=1)
    return np.concatenate([head, _nibbles(q[:, :16], q[:, 16:])], axis=1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    mn, d = _min_max_scale(x, 31)
    xs = (x - mn[:, None]) * _inverse(d)[:, None]
    q = np.trunc(xs + F32(0.5)).astype(np.int32) & 0xFF  # C: (uint8_t)(x0 + 0.5f)
    lo, hi = q[:, :16], q[:, 16:]
    head = np.concatenate([u16_bytes(to_f16_bits(d)), u16_bytes(to_f16_bits(mn))], axis=1)
    return np.concatenate([head, u32_bytes(_fifth_bits(lo, hi)), _nibbles(lo, hi)], axis=1)


# With an importance matrix (quantize_row_q4_0_impl and its kin): each element weighted by
# qw * sqrt(sigma2 + x^2), sigma2 the mean square of the element's whole row; the 0-types fit a
# scale (make_qx_quants), the 1-types a scale and a min (make_qkx3_quants), and no
# rounding pass follows.

def row_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """qw * sqrtf(sigma2 + x*x) for blocks x, qw `(nb, 32)` and their rows' sigma2 `(nb,)`."""
    return (qw * np.sqrt(sigma2[:, None] + x * x)).astype(F32)


def _fit_scale(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    scale, L = make_qx_quants_rmse1(np.ascontiguousarray(x.T), nmax, np.ascontiguousarray(w.T))
    return scale, L.T


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale, the_min, L = make_qkx2_quants(np.ascontiguousarray(x.T), np.ascontiguousarray(w.T), nmax, -0.9, 0.05, 36)
    return scale, (-the_min).astype(F32), L.T.astype(np.int32)


def quantize_q4_0_weighted(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    d, q = _fit_scale(x, w, 8)
    return np.concatenate([u16_bytes(to_f16_bits(d)), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def quantize_q5_0_weighted(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    d, q = _fit_scale(x, w, 16)
    lo, hi = q[:, :16], q[:, 16:]
    return np.concatenate([u16_bytes(to_f16_bits(d)), u32_bytes(_fifth_bits(lo, hi)), _nibbles(lo, hi)], axis=1)


def quantize_q4_1_weighted(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    d, m, q = _fit_scale_min(x, w, 15)
    head = np.concatenate([u16_bytes(to_f16_bits(d)), u16_bytes(to_f16_bits(m))], axis=1)
    return np.concatenate([head, _nibbles(q[:, :16], q[:, 16:])], axis=1)


def quantize_q5_1_weighted(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    d, m, q = _fit_scale_min(x, w, 31)
    lo, hi = q[:, :16], q[:, 16:]
    head = np.concatenate([u16_bytes(to_f16_bits(d)), u16_bytes(to_f16_bits(m))], axis=1)
    return np.concatenate([head, u32_bytes(_fifth_bits(lo, hi)), _nibbles(lo, hi)], axis=1)
