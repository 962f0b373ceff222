"""ggml's Q4_K and Q5_K: 256-element super-blocks of eight 32-element sub-blocks with a scale
and a min each (ports of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref` and
`make_qkx2_quants`).

    Q4_K (144 B): f16 d | f16 dmin | u8 scales[12] | u8 qs[128]
    Q5_K (176 B): f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128]

scales[12] packs eight 6-bit (scale, min) pairs:
    j < 4:  sc = s[j] & 63,                         m = s[j+4] & 63
    j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4, m = (s[j+4] >> 4) | (s[j] >> 6) << 4
x = d*sc*q - dmin*m. For chunk g (0..3) of 64 elements, byte qs[32g + l] holds element
64g + l in its low nibble and 64g + 32 + l in its high nibble; in Q5_K bit 2g of qh[l] is the
fifth bit of element 64g + l and bit 2g+1 that of element 64g + 32 + l.
"""

from __future__ import annotations

import numpy as np

from .common import F32, f16_round, nearest_int, seq_sum, to_f16_bits, u16_bytes

QK_K = 256


def _levels(x: np.ndarray, mn: np.ndarray, iscale: np.ndarray, nmax: int, out: np.ndarray) -> np.ndarray:
    """clamp(nearest_int(iscale * (x - min)), 0, nmax) into `out` (float32).

    The argument lies in [0, nmax + 1], where round-half-even `rint` equals ggml's nearest_int.
    """
    np.subtract(x, mn, out=out)
    np.multiply(out, iscale, out=out)
    np.rint(out, out=out)
    return np.clip(out, 0, nmax, out=out)


def _weighted_error(x: np.ndarray, w: np.ndarray, L: np.ndarray, scale: np.ndarray, mn: np.ndarray,
                    out: np.ndarray) -> np.ndarray:
    """Sequential sum of w * (scale*L + min - x)^2, evaluated in ggml's order."""
    np.multiply(L, scale, out=out)
    np.add(out, mn, out=out)
    np.subtract(out, x, out=out)
    np.multiply(out, out, out=out)
    np.multiply(out, w, out=out)
    return seq_sum(out)


def make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_qkx2_quants` with use_mad = false, vectorized over groups.

    x, w: float32 `(n, groups)`. Returns (scale, the_min, L) with L uint8 `(n, groups)`.
    """
    mx = x.max(axis=0)
    mn = x.min(axis=0)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    mn = np.where(mn > 0, F32(0), mn).astype(F32)
    mn_flat = mn
    flat = mx == mn
    rng = np.where(flat, F32(1), mx - mn).astype(F32)

    iscale = (F32(nmax) / rng).astype(F32)
    scale = (F32(1) / iscale).astype(F32)
    tmp = np.empty_like(x)
    laux = np.empty_like(x)
    _levels(x, mn, iscale, nmax, laux)
    best_error = _weighted_error(x, w, laux, scale, mn, tmp)
    # L is a pure function of (min, iscale): remember the winning pair, build L once at the end.
    l_min, l_iscale = mn, iscale
    # w*L, w*L*L, w*L*x side by side so one sequential pass sums all three
    stacked = np.empty((x.shape[0], 3, x.shape[1]), dtype=F32)
    wl, wll, wlx = stacked[:, 0], stacked[:, 1], stacked[:, 2]

    for step in range(nstep + 1):
        # ggml updates `min` on every improvement, and later steps use the new one.
        rng = np.where(flat, F32(1), mx - mn).astype(F32)
        iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / rng).astype(F32)
        _levels(x, mn, iscale, nmax, laux)
        np.multiply(w, laux, out=wl)
        np.multiply(wl, laux, out=wll)
        np.multiply(wl, x, out=wlx)
        sum_l, sum_l2, sum_xl = seq_sum(stacked)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale).astype(F32)
        this_min = np.where(clamp, F32(0), this_min).astype(F32)
        cur_error = _weighted_error(x, w, laux, this_scale, this_min, tmp)
        better = (det > 0) & (cur_error < best_error)
        l_min = np.where(better, mn, l_min)
        l_iscale = np.where(better, iscale, l_iscale)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)

    L = _levels(x, l_min, l_iscale, nmax, laux)
    L[:, flat] = 0
    scale = np.where(flat, F32(0), scale).astype(F32)
    mn = np.where(flat, mn_flat, mn)
    return scale, (-mn).astype(F32), L.astype(np.uint8)


def _pack_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """ls, lm: uint8 (8, nb) 6-bit values -> (nb, 12) packed bytes."""
    s = np.zeros((12, ls.shape[1]), dtype=np.uint8)
    s[0:4] = ls[0:4]
    s[4:8] = lm[0:4]
    s[8:12] = (ls[4:8] & 0xF) | ((lm[4:8] & 0xF) << 4)
    s[0:4] |= (ls[4:8] >> 4) << 6
    s[4:8] |= (lm[4:8] >> 4) << 6
    return s.T


def _quantize_minmax(
    x: np.ndarray, nmax: int, rmin: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shared body of Q4_K/Q5_K: returns (header bytes (nb, 16), levels L (nb, 256))."""
    nb = x.shape[0]
    # element-major and contiguous: strided views make every pass below ~3x slower
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, nb*8)
    sum_x2 = seq_sum(sub * sub)
    av_x = np.sqrt(sum_x2 / F32(32)).astype(F32)
    weights = av_x + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.T.reshape(nb, 8, 32)

    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)  # (nb, 8)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    d = (max_scale / F32(63)).astype(F32)
    dmin = (max_min / F32(63)).astype(F32)

    # Second pass with the 6-bit scales as stored (get_scale_min_k4 returns ls/lm again).
    dj = f16_round(d)[:, None] * ls.astype(F32)  # (nb, 8)
    dmj = f16_round(dmin)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x.reshape(nb, 8, 32) + dmj[:, :, None]) / dj[:, :, None]), 0, nmax)
    L = np.where((dj != 0)[:, :, None], requant, L).astype(np.uint8).reshape(nb, QK_K)

    header = np.concatenate(
        [u16_bytes(to_f16_bits(d)), u16_bytes(to_f16_bits(dmin)), _pack_scales(ls.T, lm.T)], axis=1
    )
    return header, L


def _low_nibbles(L: np.ndarray) -> np.ndarray:
    """(nb, 256) levels -> (nb, 128) bytes: chunk g, byte l = L[64g+l] | L[64g+32+l] << 4."""
    c = L.reshape(-1, 4, 2, 32)
    return ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(-1, 128).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    header, L = _quantize_minmax(x, 15, -1.0, 20)
    return np.concatenate([header, _low_nibbles(L)], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    header, L = _quantize_minmax(x, 31, -0.5, 15)
    c = L.reshape(-1, 4, 2, 32)
    hi = (c >> 4) & 1  # (nb, 4, 2, 32)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # (4, 2)
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2)).astype(np.uint8)  # (nb, 32)
    return np.concatenate([header, qh, _low_nibbles(L)], axis=1)
