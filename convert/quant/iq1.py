"""ggml's IQ1_S and IQ1_M (ports of `quantize_row_iq1_s_impl` and `quantize_row_iq1_m_impl`).

    IQ1_S (50 B a 256): f16 d | qs[32]: a 2048-grid index's low byte a 8 weights | u16 qh[8], one
        a 32-weight sub-block: the four indices' bits 8-10 at 3k, ls at bits 12-14, bit 15 the
        shift's sign; w = d (2 ls + 1) (g + delta), g in {-1, 0, 1}, delta = +-1/8.
    IQ1_M (56 B): qs[32] | qh[16]: a nibble a 8 weights (index bits 8-10, bit 3 the shift's sign) |
        u16 sc[4]: a 3-bit ls a 16 weights at 3j, d's f16 bits in the four top nibbles.

Each sub-block's levels come from an exhaustive search: its weights sorted (glibc's qsort, a
stable merge sort for these sizes: equal values keep their order), every split of the sorted
run into three groups (levels -1, 0, 1, each shifted by +delta or -delta; IQ1_M picks the shift
of each half of the sub-block apart) is scored from prefix sums, the best weighted fit kept (the
first of equals, in ggml's scan order). Then each 8 weights' levels are snapped to the grid (off
it: the neighbour nearest at that scale, grid_search.best_neighbours with the shifted levels) and
the scale refitted. IQ1_S's d is the largest scale / 15 (stored times 1.125); IQ1_M's is refitted
over the whole block (times 1.1125). Both need importance values in llama-quantize (IQ1_S in
ggml too); IQ1_M's quantizer takes x^2 without them.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .common import F32, nearest_int, seq_sum, to_f16_bits, u16_bytes
from .grid_fit import subblock_weights
from .grid_search import best_neighbours, grid_tables

QK_K = 256
DELTA = F32(0.125)  # IQ1S_DELTA, IQ1M_DELTA
X_P = np.array([F32(-1) + DELTA, DELTA, F32(1) + DELTA], dtype=F32)
X_M = np.array([F32(-1) - DELTA, -DELTA, F32(1) - DELTA], dtype=F32)
FLT_MAX = F32(np.finfo(np.float32).max)


def _scan(sumqx: np.ndarray, sumq2: np.ndarray, first_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's running best over candidates (c, n) in order: `sumq2 > 0 && sumqx^2 > best * sumq2`
    takes scale = sumqx / sumq2, best = scale * sumqx. Returns (scale (n,), the candidate taken
    (n,), -1 for none)."""
    best = np.full(sumqx.shape[1], -FLT_MAX, dtype=F32)
    scale = first_scale.astype(F32)
    taken = np.full(sumqx.shape[1], -1, dtype=np.int64)
    for c in range(sumqx.shape[0]):
        qx, q2 = sumqx[c], sumq2[c]
        take = (q2 > 0) & (qx * qx > best * q2)
        if take.any():
            s = (qx / np.where(take, q2, F32(1))).astype(F32)
            scale = np.where(take, s, scale)
            best = np.where(take, s * qx, best).astype(F32)
            taken = np.where(take, c, taken)
    return scale, taken


def _sorted(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-blocks (size, n) -> (the sorted order: position j holds element order[j], stable as
    glibc's merge sort; each element's rank in it)."""
    order = np.argsort(xs, axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(xs.shape[0])[:, None], axis=0)
    return order, rank


def _pairs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's split loops: i1 from 0 to size, i2 from i1 to size."""
    i1, i2 = np.triu_indices(size + 1)
    return i1, i2


def _levels(rank: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> np.ndarray:
    """Ranks below i1 take level 0, below i2 level 1, the rest 2."""
    return np.where(rank < i1, 0, np.where(rank < i2, 1, 2))


def _snap(L: np.ndarray, xs: np.ndarray, ws: np.ndarray, scale: np.ndarray, minus: np.ndarray,
          live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels (size, n) -> each 8 weights' grid index (groups, n) (the best neighbour off the grid,
    at `scale` with each group's shifted levels: minus (groups, n) picks X_M) and whether any was off."""
    tables = grid_tables(T.IQ1_S)
    groups = L.shape[0] // 8
    u = tables.point(L.reshape(groups, 8, -1).transpose(1, 0, 2))
    index = tables.kmap[u]
    off = (index < 0) & live
    for values, sign in ((X_P, False), (X_M, True)):
        k, j = np.nonzero(off & (minus == sign))
        if k.size:
            xv, wv = xs.reshape(groups, 8, -1)[k, :, j], ws.reshape(groups, 8, -1)[k, :, j]
            index[k, j] = best_neighbours(tables, u[k, j], xv, wv, scale[j], values)
    return np.where(live, index, 0), off.any(0)


def _refit(index: np.ndarray, xs: np.ndarray, ws: np.ndarray, minus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum w q x and sum w q^2 over the sub-block's grid levels (q the shifted level), in order."""
    levels = grid_tables(T.IQ1_S).levels[index]  # (groups, n, 8)
    q = np.where(minus[..., None], X_M[levels], X_P[levels]).transpose(0, 2, 1).reshape(xs.shape)
    return seq_sum(ws * q * xs), seq_sum(ws * q * q)


def _flipped(L: np.ndarray, scale: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A negative best scale: levels mirrored (2 - L), the scale made positive (ggml's way)."""
    flip = live & (scale < 0)
    return np.where(flip, 2 - L, L), np.where(flip, -scale, scale).astype(F32), flip


def _fit_grid(L: np.ndarray, xs: np.ndarray, ws: np.ndarray, scale: np.ndarray, minus: np.ndarray,
              live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels snapped to the grid (_snap), and where a vector was off it the scale refitted (when
    sum w q x and sum w q^2 are both positive). Returns (index (groups, n), scale (n,), 0 where dead)."""
    index, any_off = _snap(L, xs, ws, scale, minus, live)
    qx, q2 = _refit(index, xs, ws, minus)
    refit = live & any_off & (qx > 0) & (q2 > 0)
    scale = np.where(refit, qx / np.where(refit, q2, F32(1)), scale).astype(F32)
    return index, np.where(live, scale, F32(0)).astype(F32)


def _block_scales(scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nb, subs) sub-block scales -> (d = the largest / 15 (nb,), 3-bit ls (nb, subs): the nearest
    (2 ls + 1) d, empty blocks (nb,))."""
    max_scale = scale.max(1)
    empty = max_scale == 0
    d = (np.where(empty, F32(1), max_scale) / F32(15)).astype(F32)
    return d, np.clip(nearest_int(F32(0.5) * ((F32(1) / d)[:, None] * scale - F32(1))), 0, 7), empty


def quantize_iq1_s(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 and importance values -> (nb, 50) uint8."""
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(-1, 32).T)  # (32, n)
    ws = subblock_weights(x, xs, qw)
    live = np.abs(xs).max(0) >= F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
    order, rank = _sorted(xs)
    zero = np.zeros((1, xs.shape[1]), dtype=F32)
    sumx = np.add.accumulate(np.concatenate([zero, np.take_along_axis(ws * xs, order, axis=0)]), axis=0)  # sequential
    sumw = np.add.accumulate(np.concatenate([zero, np.take_along_axis(ws, order, axis=0)]), axis=0)
    i1, i2 = _pairs(32)
    a, b, c = sumx[i1], sumx[i2] - sumx[i1], sumx[32] - sumx[i2]
    aw, bw, cw = sumw[i1], sumw[i2] - sumw[i1], sumw[32] - sumw[i2]
    cand_qx, cand_q2 = [], []
    for v in (X_P, X_M):  # per split: +delta first, then -delta
        cand_qx.append(a * v[0] + b * v[1] + c * v[2])
        cand_q2.append(aw * v[0] * v[0] + bw * v[1] * v[1] + cw * v[2] * v[2])
    sumqx = np.stack(cand_qx, 1).reshape(-1, xs.shape[1])
    sumq2 = np.stack(cand_q2, 1).reshape(-1, xs.shape[1])
    scale, taken = _scan(sumqx, sumq2, np.abs(xs).max(0))
    live &= taken >= 0
    pair, minus = np.maximum(taken, 0) // 2, taken % 2 == 1
    L, scale, flip = _flipped(_levels(rank, i1[pair], i2[pair]), scale, live)
    minus ^= flip
    index, scale = _fit_grid(L, xs, ws, scale, np.broadcast_to(minus, (4, xs.shape[1])), live)
    d, ls, empty = _block_scales(scale.reshape(nb, 8))
    index = index.T.reshape(nb, 8, 4)
    qh = (index >> 8 << (3 * np.arange(4))).sum(2) | ls << 12 | (minus & live).reshape(nb, 8) << 15
    out = np.concatenate([u16_bytes(to_f16_bits(d * F32(1.125))), (index & 255).reshape(nb, 32).astype(np.uint8),
                          u16_bytes(qh.reshape(-1)).reshape(nb, 16)], axis=1)
    out[empty] = 0
    return out


def quantize_iq1_m(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 56) uint8."""
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(-1, 16).T)  # (16, n)
    ws = subblock_weights(x, xs, qw)
    n = xs.shape[1]
    live = np.abs(xs).max(0) >= F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
    order, rank = _sorted(xs)
    zero = np.zeros((1, n), dtype=F32)
    px, pw = [], []
    for h in (0, 1):  # prefix sums of each half over the sorted run (the other half's elements add nothing)
        mine = (order < 8) if h == 0 else (order >= 8)
        wx = np.where(mine, np.take_along_axis(ws * xs, order, axis=0), F32(0))
        wv = np.where(mine, np.take_along_axis(ws, order, axis=0), F32(0))
        px.append(np.add.accumulate(np.concatenate([zero, wx]), axis=0))
        pw.append(np.add.accumulate(np.concatenate([zero, wv]), axis=0))
    p2, m2 = X_P[2], X_M[2]
    cp1, cp2 = X_P[0] * X_P[0] - X_P[1] * X_P[1], X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1, cm2 = X_M[0] * X_M[0] - X_M[1] * X_M[1], X_M[1] * X_M[1] - X_M[2] * X_M[2]
    i1, i2 = _pairs(16)
    qx_p, qx_m, q2_p, q2_m = [], [], [], []
    for h in (0, 1):
        sx = px[h][i1] + px[h][i2]
        qx_p.append(px[h][16] * p2 - sx)
        qx_m.append(px[h][16] * m2 - sx)
        q2_p.append(pw[h][16] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2)
        q2_m.append(pw[h][16] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2)
    sumqx = np.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], 1).reshape(-1, n)
    sumq2 = np.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], 1).reshape(-1, n)
    scale, taken = _scan(sumqx, sumq2, np.abs(xs).max(0))
    live &= taken >= 0
    pair, k = np.maximum(taken, 0) // 4, taken % 4
    L, scale, flip = _flipped(_levels(rank, i1[pair], i2[pair]), scale, live)
    k = np.where(live, np.where(flip, 3 - k, k), 0)  # the flip swaps the shifts: (+,+) <-> (-,-), (+,-) <-> (-,+)
    minus = np.stack([k >= 2, k % 2 == 1])  # (2, n): each half's shift
    index, scale = _fit_grid(L, xs, ws, scale, minus, live)
    d, ls, empty = _block_scales(scale.reshape(nb, 16))
    # d refitted over the block: every sub-block's levels times its 2 ls + 1 (dead ones too, as ggml's loop)
    levels = grid_tables(T.IQ1_S).levels[index]  # (2, n, 8)
    q = np.where(minus[..., None], X_M[levels], X_P[levels]).transpose(1, 0, 2).reshape(nb, 256)
    q = q * np.repeat((2 * ls + 1).astype(F32), 16, axis=1)
    xb, wb = x.T, ws.T.reshape(nb, QK_K).T  # (256, nb): each block's elements in order
    qT = np.ascontiguousarray(q.T)
    sumqx_f, sumq2_f = seq_sum(wb * qT * xb), seq_sum(wb * qT * qT)
    d = np.where(sumq2_f > 0, sumqx_f / np.where(sumq2_f > 0, sumq2_f, F32(1)), d).astype(F32)
    dh = to_f16_bits(d * F32(1.1125)).astype(np.int64)
    sc = (ls.reshape(nb, 4, 4) << (3 * np.arange(4))).sum(2)
    sc |= (dh[:, None] >> (4 * np.arange(4)) & 0xF) << 12
    masks = np.array([0x00, 0x80, 0x08, 0x88])
    index = index.T.reshape(nb, 16, 2)
    qh = (index[..., 0] >> 8) | (index[..., 1] >> 8) << 4 | masks[k].reshape(nb, 16)
    out = np.concatenate([(index & 255).reshape(nb, 32).astype(np.uint8), qh.astype(np.uint8),
                          u16_bytes(sc.reshape(-1)).reshape(nb, 8)], axis=1)
    out[empty] = 0
    return out
