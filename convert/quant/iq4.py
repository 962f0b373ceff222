"""ggml's IQ4_NL and IQ4_XS: 4-bit indices into 16 non-linear levels (kvalues_iq4nl, -127..113)
with a scale per 32 weights (ports of `quantize_row_iq4_nl_impl` as `quantize_iq4_nl` and
`quantize_iq4_xs` call it, i.e. as llama-quantize writes them: 7 trial scales each side, with an
importance matrix or without).

    IQ4_NL (18 B):  f16 d | u8 qs[16]                                   x = d * v[q]
    IQ4_XS (136 B): f16 d | u16 scales_h | u8 scales_l[4] | u8 qs[128]
        x = d * (ls - 32) * v[q], ls six bits: the low four in scales_l[j / 2] (nibble j % 2),
        the high two at bit 2j of scales_h
Byte j of a 32-weight block's qs holds weight j in its low nibble and weight j + 16 in its high.
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, nearest_int, seq_sum, to_f16_bits, u16_bytes
from .q6_k import _first_absmax

LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_LV = LEVELS.astype(F32)
NTRY = 7


_MIDPOINTS = ((LEVELS[:-1].astype(np.float64) + LEVELS[1:]) / 2).astype(F32)  # whole or half numbers: exact


def best_index(x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, x): the nearest level's index, the upper on a tie.

    Its `x - v[mu-1] < v[mu] - x` is `x < (v[mu-1] + v[mu]) / 2` exactly: near a midpoint both
    differences are under 16, and float32 holds them exactly there. So the index is the count of
    midpoints at or below x (15 comparisons: ~15x faster than numpy's binary search here), counted
    as those x is not below: a NaN, below none, takes 15, as ggml's search ends for it."""
    out = np.zeros(x.shape, np.int8)
    for m in _MIDPOINTS:
        out += ~(x < m)
    return out


def _fit(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each 32-weight group's scale (element-major `(32, g)`): the levels of its largest value,
    then 15 trial scales, the best weighted fit kept (0 for an all-zero group)."""
    mx = _first_absmax(x, axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe = np.where(zero, F32(1), mx).astype(F32)
    d = (-safe / _LV[0]).astype(F32)
    q = _LV[best_index((F32(1) / d).astype(F32) * x)]
    sumqx, sumq2 = seq_sum(w * q * x), seq_sum(w * q * q)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        iscale = (F32(itry + int(LEVELS[0])) / safe).astype(F32)
        q = _LV[best_index(iscale * x)]
        sumqx, sumq2 = seq_sum(w * q * x), seq_sum(w * q * q)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(better, sumqx / sumq2, d).astype(F32)
        best = np.where(better, d * sumqx, best).astype(F32)
    return np.where(zero, F32(0), d).astype(F32)


def _weights(x: np.ndarray, qw: np.ndarray | None, super_size: int) -> np.ndarray:
    """x*x, or qw * sqrtf(sigma2 + x^2) with sigma2 twice the super-block's mean square (ggml's
    `sigma2 *= 2.f/size` here, not the K-quants' 2 * s / QK_K of k_minmax.sigma2_weights: the
    roundings differ); blocks `(nb, super_size)` in, element-major `(32, nb * super_size / 32)` out."""
    sub = np.ascontiguousarray(x.reshape(-1, 32).T)
    if qw is None:
        return sub * sub
    whole = np.ascontiguousarray(x.T)
    sigma2 = (seq_sum(whole * whole) * (F32(2) / F32(super_size))).astype(F32)
    sigma2 = np.repeat(sigma2, super_size // 32)[None, :]
    return (np.ascontiguousarray(qw.reshape(-1, 32).T) * np.sqrt(sigma2 + sub * sub)).astype(F32)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """(n, 32) indices -> (n, 16) bytes: j | (j + 16) << 4."""
    return (L[:, :16] | (L[:, 16:] << 4)).astype(np.uint8)


def quantize_iq4_nl(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    sub = np.ascontiguousarray(x.T)  # (32, nb)
    scale = _fit(sub, _weights(x, qw, 32))
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, F32(1) / scale, F32(0)).astype(F32)
    L = best_index(inv[:, None] * x)
    return np.concatenate([u16_bytes(to_f16_bits(scale)), _nibbles(L)], axis=1)


def quantize_iq4_xs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, nb*8)
    scales = _fit(sub, _weights(x, qw, 256)).reshape(nb, 8)
    max_scale = _first_absmax(scales, axis=1)
    d = (-max_scale / F32(32)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    ls = np.clip(nearest_int(inv[:, None] * scales), -32, 31)  # (nb, 8)
    dl = (d[:, None] * ls.astype(F32)).astype(F32)
    with np.errstate(divide="ignore"):
        idl = np.where(dl != 0, F32(1) / dl, F32(0)).astype(F32)
    L = best_index(idl[:, :, None] * x.reshape(nb, 8, 32)).reshape(nb * 8, 32)
    ls = (ls + 32).astype(np.uint16)
    low = (ls & 0xF).astype(np.uint8)
    scales_l = (low[:, 0::2] | (low[:, 1::2] << 4)).astype(np.uint8)  # (nb, 4)
    scales_h = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))[None, :]).sum(axis=1).astype(np.uint16)
    return np.concatenate([u16_bytes(to_f16_bits(d)), u16_bytes(scales_h), scales_l,
                           _nibbles(L).reshape(nb, 128)], axis=1)
