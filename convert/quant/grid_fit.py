"""The scale search ggml's IQ2 and IQ3 quantizers share (quantize_row_iq2_xxs_impl, _iq2_xs_impl,
_iq2_s_impl, _iq3_xxs_impl, _iq3_s_impl), vectorized over sub-blocks.

Each sub-block (32 or 16 weights, one scale) is fitted on its magnitudes xval: where the type
keeps 7 sign bits a group of 8 (the 8th their parity), a group with an odd count of negatives
first flips the sign of its least weighty weight (least w x^2, the first of equals). Then 2n + 1
trial scales around the top level (`top` levels l, q = 2l + 1): at each, every `width` weights take
their nearest levels or, off the grid, their best neighbour (grid_search.best_neighbours), and the
scale with the best weighted fit wins. Vectors it left off the grid are searched again at the
fitted scale and the scale refitted (IQ3_S searches every vector again then; IQ2_XXS, which
starts from make_qp_quants' scale, always does). Weights: with an importance matrix
qw * sqrt(sigma2 + x^2), sigma2 a multiple of the 256-block's mean square; without one x^2
(IQ2_S: sigma2 / 4 + x^2). Every float operation is ggml's, in its order, in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from .common import F32, nearest_int, seq_sum, to_f16_bits
from .grid_search import GridTables, best_neighbours, grid_tables
from .k_minmax import block_sigma2, make_qp_quants, sigma2_weights

QK_K = 256


@dataclass(frozen=True)
class GridFit:
    """One type's search, as its ggml quantizer runs it."""

    qtype: T
    sub: int  # weights a scale
    top: int  # kMaxQ: levels 0 .. top - 1
    steps: int  # trial scales -steps .. steps
    step: float  # 0.2f or 0.1f apart (in units of q)
    eps: float  # a sub-block whose largest |x| is below it is all zero (0: only an exact 0)
    parity: bool  # 7 sign bits a group of 8: an odd count of negatives flips the least weighty
    sigma: int  # sigma2 = sigma * sum x^2 / 256
    redo_all: bool  # the second search takes every vector of the sub-block, not only off-grid ones
    qp_start: bool  # IQ2_XXS: starts from make_qp_quants and searches again whenever scale > 0
    fudge: float  # d = largest scale / 31, stored times this

    @property
    def tables(self) -> GridTables:
        return grid_tables(self.qtype)


FITS = {
    T.IQ3_XXS: GridFit(T.IQ3_XXS, 32, 8, 15, 0.2, 1e-8, True, 2, False, False, 1.0125),
    T.IQ3_S: GridFit(T.IQ3_S, 32, 8, 9, 0.2, 0.0, False, 2, True, False, 1.033),
    T.IQ2_XXS: GridFit(T.IQ2_XXS, 32, 3, 6, 0.1, 1e-15, True, 1, True, True, 1.0),
    T.IQ2_XS: GridFit(T.IQ2_XS, 16, 3, 9, 0.1, 1e-15, True, 1, False, False, 1.0),
    T.IQ2_S: GridFit(T.IQ2_S, 16, 3, 9, 0.1, 1e-8, False, 2, False, False, 0.9875),
}


@dataclass(frozen=True)
class Fitted:
    """A chunk's sub-blocks, n of them, element-major."""

    scale: np.ndarray  # (n,) float32, >= 0; 0 for an all-zero sub-block
    levels: np.ndarray  # (sub, n) int: the levels l
    negative: np.ndarray  # (sub, n) bool: the signs stored (after the parity flip)
    live: np.ndarray  # (n,) bool: not all zero

    def grid_indices(self, tables: GridTables) -> np.ndarray:
        """(n, groups) the grid index of every vector (0 for a dead sub-block)."""
        width = tables.width
        index = tables.kmap[tables.point(self.levels.reshape(-1, width, self.levels.shape[1]).transpose(1, 0, 2))].T
        return np.where(self.live[:, None], index, 0)

    def sign_bits(self, parity: bool) -> np.ndarray:
        """(n, sub / 8) the sign byte of each 8 weights (bit i: weight i); & 127 where 7 are kept;
        0 for a dead sub-block (ggml writes none)."""
        bits = (self.negative.reshape(-1, 8, self.negative.shape[1]) * (1 << np.arange(8))[None, :, None]).sum(1)
        return np.where(self.live[:, None], (bits & 127 if parity else bits).T, 0).astype(np.int64)

    def sign_words(self) -> np.ndarray:
        """(n,) uint32: a 32-weight sub-block's four 7-bit sign indices at bits 0, 7, 14, 21 (IQ2_XXS,
        IQ3_XXS; its ls goes in bits 28-31)."""
        signs = self.sign_bits(parity=True)
        return (signs[:, 0] | signs[:, 1] << 7 | signs[:, 2] << 14 | signs[:, 3] << 21).astype(np.uint32)


def subblock_weights(x: np.ndarray, xs: np.ndarray, qw: np.ndarray | None, sigma: int = 2,
                     quarter: bool = False) -> np.ndarray:
    """Each element's weight over the element-major sub-blocks xs (sub, n) of blocks x (nb, 256):
    with importance values k_minmax.sigma2_weights' qw * sqrt(sigma2 + x^2); without, x^2 (IQ2_S's,
    quarter: sigma2 / 4 + x^2); sigma2 = `sigma` times the block's mean square."""
    if qw is not None:
        return sigma2_weights(x, qw, xs, sigma)
    if quarter:
        return F32(0.25) * np.repeat(block_sigma2(x, sigma), QK_K // xs.shape[0])[None, :] + xs * xs
    return xs * xs


def _snap(fit: GridFit, xval: np.ndarray, waux: np.ndarray, inv: np.ndarray, scale: np.ndarray,
          todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every vector of the sub-blocks (xval, waux: (sub, n)) at 1/scale = inv (n,): its nearest
    levels, or where that point is off the grid (and the vector is marked in todo (groups, n))
    its best neighbour at `scale`. Returns (levels (sub, n), on_grid (groups, n))."""
    tables = fit.tables
    width = tables.width
    L = np.clip(nearest_int(F32(0.5) * (inv * xval - F32(1))), 0, fit.top - 1).reshape(-1, width, xval.shape[1])
    u = tables.point(L.transpose(1, 0, 2))
    on_grid = tables.kmap[u] >= 0
    k, j = np.nonzero(~on_grid & todo)
    if k.size:
        xv, wv = xval.reshape(L.shape), waux.reshape(L.shape)
        L[k, :, j] = tables.levels[best_neighbours(tables, u[k, j], xv[k, :, j], wv[k, :, j], scale[j])]
    return L.reshape(fit.sub, -1), on_grid


def _fit(weight: np.ndarray, xval: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = (F32(2) * L + F32(1)).astype(F32)
    return seq_sum(weight * xval * q), seq_sum(weight * q * q)


def fit_subblocks(x: np.ndarray, qw: np.ndarray | None, fit: GridFit) -> Fitted:
    """(nb, 256) float32 blocks (and the importance values, or None) -> their sub-blocks' fit."""
    xs = np.ascontiguousarray(x.reshape(-1, fit.sub).T)  # (sub, n)
    ws = subblock_weights(x, xs, qw, fit.sigma, quarter=fit.qtype == T.IQ2_S)
    negative = xs < 0
    xval = np.abs(xs)
    if fit.parity:
        ax = (ws * xs * xs).reshape(-1, 8, xs.shape[1])
        odd = negative.reshape(ax.shape).sum(1) % 2 == 1  # (sub / 8, n)
        g, j = np.nonzero(odd)
        flat = 8 * g + ax.argmin(1)[g, j]
        xval[flat, j] = -xval[flat, j]
        negative[flat, j] = ~negative[flat, j]
    mx = xval.max(0)
    live = mx >= F32(fit.eps) if fit.eps else mx != 0
    n = xs.shape[1]
    groups = fit.sub // fit.tables.width
    everywhere = np.ones((groups, n), dtype=bool)
    waux = np.sqrt(ws)
    L = np.zeros((fit.sub, n), dtype=np.int64)
    if fit.qp_start:
        scale, _ = make_qp_quants(xval, fit.top + 1, ws)
        span = (scale * F32(fit.top)).astype(F32)  # eff_max
        live &= span > 0
    else:
        scale = (mx / F32(2 * fit.top - 1)).astype(F32)
        span = mx
    span = np.where(live, span, F32(1))
    best = np.zeros(n, dtype=F32)
    on_grid = np.full((groups, n), fit.qtype != T.IQ3_S)  # IQ3_S alone starts them off the grid
    for step in range(-fit.steps, fit.steps + 1):
        inv = ((F32(2 * fit.top - 1) + F32(step) * F32(fit.step)) / span).astype(F32)
        Laux, aux_on = _snap(fit, xval, waux, inv, (F32(1) / inv).astype(F32), everywhere)
        sumqx, sumq2 = _fit(ws, xval, Laux)
        take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        scale = np.where(take, sumqx / np.where(take, sumq2, F32(1)), scale).astype(F32)
        best = np.where(take, scale * sumqx, best).astype(F32)
        L = np.where(take, Laux, L)
        on_grid = np.where(take, aux_on, on_grid)
    again = (scale > 0) & (np.ones(n, dtype=bool) if fit.qp_start else (~on_grid).any(0)) & live
    if again.any():
        inv = (F32(1) / np.where(again, scale, F32(1))).astype(F32)
        redo = everywhere if fit.redo_all else ~on_grid
        Lnew, _ = _snap(fit, xval, waux, inv, scale, redo)
        L = np.where(np.repeat(redo, fit.tables.width, axis=0) & again, Lnew, L)
        sumqx, sumq2 = _fit(ws, xval, L)
        scale = np.where(again & (sumq2 > 0), sumqx / np.where(sumq2 > 0, sumq2, F32(1)), scale).astype(F32)
    negative ^= live & (scale < 0)  # never in practice: ggml flips the signs to keep the scale positive
    scale = np.where(live, np.abs(scale), F32(0)).astype(F32)
    return Fitted(scale, L, negative, live)


def nibble_pairs(ls: np.ndarray) -> np.ndarray:
    """(nb, 2k) 4-bit values -> (nb, k) bytes, the even one in the low nibble."""
    return (ls[:, 0::2] | ls[:, 1::2] << 4).astype(np.uint8)


def block_scales(scales: np.ndarray, fudge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nb, subs) sub-block scales -> (d as f16 bits (nb,), 4-bit ls (nb, subs), empty blocks (nb,)):
    d = the largest / 31 (stored times the fudge), ls the nearest (2 ls + 1) d."""
    max_scale = scales.max(1)
    empty = max_scale == 0
    d = (np.where(empty, F32(1), max_scale) / F32(31)).astype(F32)
    inv = (F32(1) / d).astype(F32)
    ls = np.clip(nearest_int(F32(0.5) * (inv[:, None] * scales - F32(1))), 0, 15)
    dh = np.where(empty, np.uint16(0), to_f16_bits(d * F32(fudge)))
    return dh, np.where(empty[:, None], 0, ls), empty

