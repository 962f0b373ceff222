"""ggml's Q6_K: 256-element super-blocks of sixteen 16-element sub-blocks with an int8 scale
each (port of `quantize_row_q6_K_ref`, `quantize_row_q6_K_impl` with an importance matrix, and
`make_qx_quants` with rmse_type 1).

    Q6_K (210 B): u8 ql[128] | u8 qh[64] | int8 scales[16] | f16 d
x = d * scale[i // 16] * (q - 32), q in 0..63. For half h (0..1) of 128 elements and l in
0..31, with e = 128h + l:
    ql[64h + l]      = q[e] & 15       | (q[e + 64] & 15) << 4
    ql[64h + l + 32] = q[e + 32] & 15  | (q[e + 96] & 15) << 4
    qh[32h + l]      = q[e] >> 4 | (q[e + 32] >> 4) << 2 | (q[e + 64] >> 4) << 4 | (q[e + 96] >> 4) << 6
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, f16_round, nearest_int, seq_sum, to_f16_bits, u16_bytes


def _first_absmax(v: np.ndarray, axis: int) -> np.ndarray:
    """The first value of largest magnitude along `axis` (strict `>` scan from 0), 0 if all 0."""
    idx = np.expand_dims(np.argmax(np.abs(v), axis=axis), axis)
    picked = np.squeeze(np.take_along_axis(v, idx, axis=axis), axis)
    return np.where(picked == 0, F32(0), picked).astype(F32)


def make_qx_quants_rmse1(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw)` over element-major groups `(n, g)`: each
    element weighted by x*x, or by `qw` (an importance matrix's weights, same shape) where given.

    Returns (scale (g,), L int32 (n, g) in 0..2*nmax-1).
    """
    mx = _first_absmax(x, axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), mx).astype(F32)
    w = x * x if qw is None else qw
    wx = w * x
    # |iscale * x| <= nmax + 1 here, where round-half-even `rint` equals ggml's nearest_int
    sums = np.empty((x.shape[0], 2, x.shape[1]), dtype=F32)  # w*x*l and w*l*l, summed in one pass

    lv = np.empty_like(x)

    def levels(iscale: np.ndarray) -> np.ndarray:
        np.multiply(x, iscale, out=lv)
        np.rint(lv, out=lv)
        return np.clip(lv, -nmax, nmax - 1, out=lv)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels(iscale)
        np.multiply(wx, lv, out=sums[:, 0])
        np.multiply(w, lv, out=sums[:, 1])
        np.multiply(sums[:, 1], lv, out=sums[:, 1])
        sumlx, suml2 = seq_sum(sums)
        return sumlx, suml2

    # L is a pure function of iscale: remember the winning iscale, build L once at the end.
    best_iscale = (F32(-nmax) / safe_max).astype(F32)
    sumlx, suml2 = trial(best_iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(F32(nmax) + F32(0.1) * F32(step)) / safe_max).astype(F32)
        sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = (sumlx / suml2).astype(F32)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    L = levels(best_iscale).astype(np.int32) + nmax
    L[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, L


def quantize_q6_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Q6_K blocks of x `(nb, 256)`; with `qw` (the importance matrix's values for these elements,
    same shape) as quantize_row_q6_K_impl weighs them (each sub-block's fit weighted by them)."""
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 16, 16).T)  # (16, nb*16), contiguous
    qsub = None if qw is None else np.ascontiguousarray(qw.reshape(nb * 16, 16).T)
    scales, L = make_qx_quants_rmse1(sub, 32, qsub)
    scales = scales.reshape(nb, 16)  # (nb, 16)
    L = L.T.reshape(nb, 16, 16)

    max_scale = _first_absmax(scales, axis=1)
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    safe = np.where(empty, F32(1), max_scale).astype(F32)
    iscale = (F32(-128) / safe).astype(F32)
    d = (F32(1) / iscale).astype(F32)
    qscale = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)

    dj = f16_round(d)[:, None] * qscale.astype(F32)  # (nb, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(nb, 16, 16) / dj[:, :, None]), -32, 31) + 32
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(nb, 2, 4, 32).astype(np.uint8)

    lo = L & 0xF
    hi = L >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate(
        [
            ql.reshape(nb, 128),
            qh.reshape(nb, 64),
            qscale.view(np.uint8),
            u16_bytes(to_f16_bits(d)),
        ],
        axis=1,
    )
    out[empty] = 0
    return out
