"""ggml's Q4_K and Q5_K: 256-element super-blocks of eight 32-element sub-blocks with a scale
and a min each (ports of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`, of their `_impl`s
with an importance matrix, and of `make_qkx2_quants` / `make_qkx3_quants` (the same fit given
weights) and `make_qp_quants`).

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

from .common import F32, GROUP_MAX_EPS, f16_round, nearest_int, seq_sum, to_f16_bits, u16_bytes

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
                    out: np.ndarray, use_mad: bool = False) -> np.ndarray:
    """Sequential sum of w * (scale*L + min - x)^2 (use_mad: w * |scale*L + min - x|), in ggml's order."""
    np.multiply(L, scale, out=out)
    np.add(out, mn, out=out)
    np.subtract(out, x, out=out)
    if use_mad:
        np.abs(out, out=out)
    else:
        np.multiply(out, out, out=out)
    np.multiply(out, w, out=out)
    return seq_sum(out)


def make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_qkx2_quants` (use_mad: the absolute error, as Q2_K fits), vectorized over groups.

    x, w: float32 `(n, groups)`. Returns (scale, the_min, L) with L uint8 `(n, groups)`.
    """
    mx = x.max(axis=0)
    # `if (x[i] < min) min = x[i]` keeps the first of equal minima: a flat group's min is its
    # first element, -0 or +0 (Q4_1 / Q5_1 with an importance matrix store it)
    mn = np.take_along_axis(x, np.argmin(x, axis=0)[None], axis=0)[0]
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
    best_error = _weighted_error(x, w, laux, scale, mn, tmp, use_mad)
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
        cur_error = _weighted_error(x, w, laux, this_scale, this_min, tmp, use_mad)
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


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`make_qp_quants(n, nmax, x, L, quant_weights)` over element-major groups `(n, g)`: the
    non-negative levels of a weighted fit of x, then ggml's five passes of moving one level at a
    time where that improves the fit. Returns (scale (g,), L (n, g) as ggml's uint8 holds them).

    Every pass is run for every group: a pass that changes nothing leaves the state as it was,
    so the passes after it (where ggml stops) change nothing either."""
    mx = np.maximum(F32(0), x.max(axis=0)).astype(F32)
    zero = mx < GROUP_MAX_EPS
    safe = np.where(zero, F32(1), mx).astype(F32)
    iscale = (F32(nmax) / safe).astype(F32)
    stored = (nearest_int(iscale * x) & 0xFF).astype(F32)  # ggml's uint8 L, unclamped the first time
    scale = (F32(1) / iscale).astype(F32)
    diff = x - scale * stored
    best = seq_sum(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = ((F32(0.1) * F32(step) + F32(nmax)) / safe).astype(F32)
        diff = x - (F32(1) / trial).astype(F32) * np.minimum(nmax, nearest_int(trial * x)).astype(F32)
        mse = seq_sum(w * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, trial, iscale).astype(F32)
    levels = np.minimum(nmax, nearest_int(iscale * x)).astype(F32)  # ints: the sums take them signed
    sumlx, suml2 = seq_sum(w * x * levels), seq_sum(w * levels * levels)
    stored = (levels.astype(np.int64) & 0xFF).astype(F32)
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], stored[i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.minimum(nmax, nearest_int(np.where(ok, xi * sl2 / slx, F32(0)))).astype(F32)
            slx_new = slx + wi * xi * new
            sl2_new = sl2 + wi * new * new
            take = ok & (new != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            stored[i] = np.where(take, (new.astype(np.int64) & 0xFF).astype(F32), li)
            sumlx = np.where(take, slx_new, sumlx).astype(F32)
            suml2 = np.where(take, sl2_new, suml2).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    out = np.where(zero, F32(0), out).astype(F32)
    stored[:, zero] = 0
    return out, stored.astype(np.uint8)


def sigma2_weights(x: np.ndarray, qw: np.ndarray, sub: np.ndarray, times: int) -> np.ndarray:
    """The K-quants' importance weights qw * sqrtf(sigma2 + x^2) over the element-major sub-blocks
    `sub` of super-blocks x `(nb, 256)`: sigma2 `times` the super-block's mean square (its sum in
    ggml's order; `times` * s / QK_K, as Q4_K / Q5_K / Q3_K (2) and Q2_K (1) compute it)."""
    group = sub.shape[0]
    qsub = np.ascontiguousarray(qw.reshape(-1, group).T)
    return (qsub * np.sqrt(np.repeat(block_sigma2(x, times), QK_K // group)[None, :] + sub * sub)).astype(F32)


def block_sigma2(x: np.ndarray, times: int) -> np.ndarray:
    """(nb, 256) -> (nb,) `times` * the sum of x^2 (in ggml's order) / QK_K."""
    whole = np.ascontiguousarray(x.T)  # (256, nb)
    return (F32(times) * seq_sum(whole * whole) / F32(QK_K)).astype(F32)  # 1 * s is s: Q2_K's sumx2/QK_K


def scale_levels(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """A super-block's sub-block scales (or mins) `(nb, n)` as ggml's reference K-quants store
    them: the nearest multiples of the largest (or 0) over `levels`; (those integers, the unit)."""
    top = np.maximum(values.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv = np.where(top > 0, F32(levels) / top, F32(0)).astype(F32)
    return nearest_int(inv[:, None] * values), (top / F32(levels)).astype(F32)


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for j = 0..7: packed (nb, 12) -> (sc, m), each (nb, 8) uint8."""
    q = packed.astype(np.uint8)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _quantize_minmax(
    x: np.ndarray, nmax: int, rmin: float, nstep: int, qw: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Shared body of Q4_K/Q5_K: returns (header bytes (nb, 16), levels L (nb, 256)). Without `qw`
    quantize_row_q4_K_ref's fit (each element weighted by the sub-block's RMS plus its size, the
    six-bit scales by the largest); with `qw` (the importance matrix's values, x's shape)
    quantize_row_q4_K_impl's (weighted by qw * sqrt(sigma2 + x^2), sigma2 twice the super-block's
    mean square; the six-bit scales fitted too, make_qp_quants)."""
    nb = x.shape[0]
    # element-major and contiguous: strided views make every pass below ~3x slower
    sub = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, nb*8)
    if qw is None:
        sum_x2 = seq_sum(sub * sub)
        av_x = np.sqrt(sum_x2 / F32(32)).astype(F32)
        weights = av_x + np.abs(sub)
        scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
        ls, d = scale_levels(scales.reshape(nb, 8), 63)
        lm, dmin = scale_levels(mins.reshape(nb, 8), 63)
        ls, lm = (np.minimum(63, v & 0xFF).astype(np.uint8) for v in (ls, lm))  # (nb, 8)
    else:
        weights = sigma2_weights(x, qw, sub, 2)
        scales, mins, L = make_qkx2_quants(sub, weights, nmax, -0.9, 0.05, 36)
        sw = seq_sum(weights).reshape(nb, 8).T  # (8, nb)
        d, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 8).T), 63, sw)
        dmin, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 8).T), 63, sw)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # Q5_K's impl clamps them; Q4_K's packs them as they are
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    L = L.T.reshape(nb, 8, 32)
    packed = _pack_scales(ls.T, lm.T)

    # Second pass with the 6-bit scales as stored (get_scale_min_k4).
    sc, m = _scale_min_k4(packed)
    dj = f16_round(d)[:, None] * sc.astype(F32)  # (nb, 8)
    dmj = f16_round(dmin)[:, None] * m.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x.reshape(nb, 8, 32) + dmj[:, :, None]) / dj[:, :, None]), 0, nmax)
    L = np.where((dj != 0)[:, :, None], requant, L).astype(np.uint8).reshape(nb, QK_K)

    header = np.concatenate([u16_bytes(to_f16_bits(d)), u16_bytes(to_f16_bits(dmin)), packed], axis=1)
    return header, L


def _low_nibbles(L: np.ndarray) -> np.ndarray:
    """(nb, 256) levels -> (nb, 128) bytes: chunk g, byte l = L[64g+l] | L[64g+32+l] << 4."""
    c = L.reshape(-1, 4, 2, 32)
    return ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(-1, 128).astype(np.uint8)


def quantize_q4_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    header, L = _quantize_minmax(x, 15, -1.0, 20, qw)
    return np.concatenate([header, _low_nibbles(L)], axis=1)


def quantize_q5_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    header, L = _quantize_minmax(x, 31, -0.5, 15, qw)
    c = L.reshape(-1, 4, 2, 32)
    hi = (c >> 4) & 1  # (nb, 4, 2, 32)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # (4, 2)
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2)).astype(np.uint8)  # (nb, 32)
    return np.concatenate([header, qh, _low_nibbles(L)], axis=1)
