"""ggml's Q3_K and Q2_K: 256-element super-blocks of sixteen 16-element sub-blocks (ports of
`quantize_row_q3_K_ref`, `make_q3_quants` and `quantize_row_q2_K_ref`, and of their `_impl`s with
an importance matrix).

    Q3_K (110 B): u8 hmask[32] | u8 qs[64] | u8 scales[12] | f16 d
        x = d * (sc - 32) * (q - 4), q 3 bits: the low two in qs, the third in hmask; the six-bit
        sc of sub-block j: its low four bits in scales[j % 8] (j < 8: low nibble, else high),
        its high two in scales[8 + j % 4] at bit 2 * (j / 4).
    Q2_K (84 B): u8 scales[16] | u8 qs[64] | f16 d | f16 dmin
        x = d * (scales[j] & 15) * q - dmin * (scales[j] >> 4), q 2 bits.
Both put element 128h + 32k + l's low two bits at bit 2k of qs[32h + l]; Q3_K's third bit of
element e in bit e / 32 of hmask[e % 32].
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, MAGIC, f16_round, nearest_int, seq_sum, to_f16_bits, u16_bytes
from .k_minmax import make_qkx2_quants, make_qp_quants, scale_levels, sigma2_weights
from .q6_k import _first_absmax, make_qx_quants_rmse1

QK_K = 256


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_q3_quants(n, nmax, x, L, do_rmse=true)` over element-major groups `(n, g)`: the levels
    of the largest value, then up to five passes moving one level at a time where the x^2-weighted
    fit improves. Returns (scale (g,), L (n, g) in 0..2*nmax-1; 0 where a group is all zero).

    A group whose pass changed nothing is done, as ggml's loop breaks there (another pass from
    the same state would change nothing again): each pass runs on the groups the one before
    changed (on N(0, 1) rows about a fifth, then a twentieth)."""
    mx = _first_absmax(x, axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    iscale = (F32(-nmax) / np.where(zero, F32(1), mx)).astype(F32)
    L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    sumlx, suml2 = seq_sum(wx * L), seq_sum(w * L * L)
    live: np.ndarray | None = None  # the groups the last pass changed (None: all)
    xs, ws, wxs, Ls, sx, s2 = x, w, wx, L, sumlx, suml2
    for _ in range(5):
        changed = _q3_pass(xs, ws, wxs, Ls, sx, s2, nmax)
        if live is None:
            live = np.flatnonzero(changed)
        else:
            L[:, live], sumlx[live], suml2[live] = Ls, sx, s2
            live = live[changed]
        if not len(live):
            break
        xs, ws, wxs, Ls, sx, s2 = x[:, live], w[:, live], wx[:, live], L[:, live], sumlx[live], suml2[live]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = (L + nmax).astype(np.int32)
    L[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), L


def _q3_pass(x: np.ndarray, w: np.ndarray, wx: np.ndarray, L: np.ndarray, sumlx: np.ndarray, suml2: np.ndarray,
             nmax: int) -> np.ndarray:
    """One pass of make_q3_quants over groups (columns), L, sumlx and suml2 updated in place, in
    ggml's float32 order (wx = w * x, as ggml's `w*x[i]` before its `*L[i]`); which groups changed.
    Written with `out=` buffers: the pass is a few dozen array operations an element."""
    g = x.shape[1]
    changed = np.zeros(g, bool)
    slx, sl2, q, new, slx_new, sl2_new = (np.empty(g, F32) for _ in range(6))
    bits = q.view(np.int32)
    ok, take = np.empty(g, bool), np.empty(g, bool)
    for i in range(x.shape[0]):
        wi, wxi, li = w[i], wx[i], L[i]
        np.subtract(sumlx, np.multiply(wxi, li, out=slx_new), out=slx)
        np.subtract(suml2, np.multiply(np.multiply(wi, li, out=sl2_new), li, out=sl2_new), out=sl2)
        np.greater(slx, 0, out=ok)
        np.multiply(x[i], sl2, out=q)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(q, slx, out=q)
        q[~ok] = 0
        np.add(q, MAGIC, out=q)  # nearest_int, in place: the low mantissa bits of q + 1.5 * 2**23
        np.subtract(np.bitwise_and(bits, 0x007FFFFF, out=bits), 0x00400000, out=bits)
        new[...] = np.clip(bits, -nmax, nmax - 1, out=bits)
        np.add(slx, np.multiply(wxi, new, out=slx_new), out=slx_new)
        np.add(sl2, np.multiply(np.multiply(wi, new, out=sl2_new), new, out=sl2_new), out=sl2_new)
        np.not_equal(new, li, out=take)
        take &= ok
        take &= sl2_new > 0
        take &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
        if take.any():
            np.copyto(li, new, where=take)
            np.copyto(sumlx, slx_new, where=take)
            np.copyto(suml2, sl2_new, where=take)
            changed |= take
    return changed


def _two_bit_codes(L: np.ndarray) -> np.ndarray:
    """(nb, 256) levels 0..3 -> (nb, 64): element 128h + 32k + l at bits 2k of byte 32h + l."""
    c = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def quantize_q3_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Q3_K blocks of x `(nb, 256)`; with `qw` (the importance matrix's values, x's shape) as
    quantize_row_q3_K_impl weighs them: each sub-block's levels fitted with qw * sqrt(sigma2 + x^2)
    (sigma2 twice the super-block's mean square), the six-bit scales fitted too."""
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 16, 16).T)  # (16, nb*16)
    if qw is None:
        scales, L = make_q3_quants(sub, 4)
        scales = scales.reshape(nb, 16)
        max_scale = _first_absmax(scales, axis=1)  # the first of the largest magnitude, 0 if all are 0
        some = max_scale != 0
        iscale = (F32(-32) / np.where(some, max_scale, F32(1))).astype(F32)
        ls = np.clip(nearest_int(iscale[:, None] * scales).astype(np.int8).astype(np.int32), -32, 31) + 32
        ls = np.where(some[:, None], ls, 0).astype(np.uint8)  # (nb, 16): six bits each
        d = np.where(some, (F32(1) / iscale).astype(F32), F32(0)).astype(F32)
    else:
        weights = sigma2_weights(x, qw, sub, 2)
        scales, L = make_qx_quants_rmse1(sub, 4, weights)
        sw = seq_sum(weights).reshape(nb, 16).T  # (16, nb)
        d, ls = make_qx_quants_rmse1(np.ascontiguousarray(scales.reshape(nb, 16).T), 32, sw)
        ls = ls.T.astype(np.uint8)
    L = L.T.reshape(nb, 16, 16)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = (ls >> 4).reshape(nb, 4, 4)  # [j // 4, j % 4]
    packed[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    sc = ls.astype(np.int32) - 32  # as read back from the packed bytes
    dj = f16_round(d)[:, None] * sc.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(nb, 16, 16) / dj[:, :, None]), -4, 3) + 4
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(nb, QK_K)
    hi = (L > 3).astype(np.uint8).reshape(nb, 8, 32)  # element 32b + m: bit b of hmask[m]
    hmask = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, _two_bit_codes(L), packed, u16_bytes(to_f16_bits(d))], axis=1)


def quantize_q2_k(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Q2_K blocks of x `(nb, 256)`; with `qw` as quantize_row_q2_K_impl weighs them (the fit
    weighted by qw * sqrt(sigma2 + x^2), sigma2 the super-block's mean square; the four-bit
    scales and mins fitted too, make_qp_quants)."""
    nb = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(nb * 16, 16).T)  # (16, nb*16)
    if qw is None:
        scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True)
        low, d = scale_levels(scales.reshape(nb, 16), 15)
        high, dmin = scale_levels(mins.reshape(nb, 16), 15)
    else:
        weights = sigma2_weights(x, qw, sub, 1)
        scales, mins, L = make_qkx2_quants(sub, weights, 3, -0.9, 0.05, 36)
        sw = seq_sum(weights).reshape(nb, 16).T  # (16, nb)
        d, low = make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 15, sw)
        dmin, high = make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 16).T), 15, sw)
        low, high = low.T.astype(np.int32), high.T.astype(np.int32)
    packed = ((low & 0xFF) | ((high << 4) & 0xFF)).astype(np.uint8)  # (nb, 16)
    L = L.T.reshape(nb, 16, 16)
    dj = f16_round(d)[:, None] * (packed & 0xF).astype(F32)
    dmj = f16_round(dmin)[:, None] * (packed >> 4).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x.reshape(nb, 16, 16) + dmj[:, :, None]) / dj[:, :, None]), 0, 3)
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(nb, QK_K)
    return np.concatenate([packed, _two_bit_codes(L), u16_bytes(to_f16_bits(d)), u16_bytes(to_f16_bits(dmin))],
                          axis=1)
