"""The lookup tables ggml's grid quantizers search (iq2xs_init_impl, iq3xs_init_impl), and their
nearest-neighbour step (iq2_find_best_neighbour, iq3_find_best_neighbour), vectorized.

A grid type codes `width` weights (8 for IQ1/IQ2, 4 for IQ3) by one of G level vectors. In the
quantizer a vector's levels are small integers l (0..3 for IQ1/IQ2's 2-bit positions, 0..7 for
IQ3's 3-bit ones), its point index the levels packed `bits` apiece; the value the search weighs
is q = 2l + 1. `kmap[point]` is the grid index of a point on the grid (-1 off it); an off-grid
point's neighbours are the grid vectors nearest it in whole-number squared distance between the
q's: all those at the `nwant` smallest distances, in ggml's order (distance, then grid index).
The grids themselves are gguf-py's dequantization tables: a value's level is its place in the
type's grid_map.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

_CLASS = {T.IQ2_XXS: quants.IQ2_XXS, T.IQ2_XS: quants.IQ2_XS, T.IQ2_S: quants.IQ2_S, T.IQ3_XXS: quants.IQ3_XXS,
          T.IQ3_S: quants.IQ3_S, T.IQ1_S: quants.IQ1_S, T.IQ1_M: quants.IQ1_M}
# per type: (bits a position in a point's index, points in ggml's kmap, nwant)
_SEARCH = {T.IQ3_XXS: (3, 4096, 2), T.IQ3_S: (3, 4096, 3), T.IQ2_XXS: (2, 43692, 2), T.IQ2_XS: (2, 43692, 2),
           T.IQ2_S: (2, 43692, 1), T.IQ1_S: (2, 43692, 3), T.IQ1_M: (2, 43692, 3)}


@dataclass(frozen=True)
class GridTables:
    """One grid type's search tables; an off-grid point's candidates are a run of `flat`."""

    levels: np.ndarray  # (G, width) int8: each grid vector's levels l
    kmap: np.ndarray  # (n_points,) int32: the grid index of an on-grid point, -1 off the grid
    start: np.ndarray  # (n_points,) int64: where a point's candidates begin in flat (ggml's order)
    count: np.ndarray  # (n_points,) int64: how many (0 on the grid)
    flat: np.ndarray  # (N,) int32: grid indices
    bits: int

    @cached_property
    def flat_q(self) -> np.ndarray:
        """(N, width) float32: the candidates' q = 2l + 1."""
        return 2 * self.levels[self.flat].astype(np.float32) + 1

    @property
    def width(self) -> int:
        return self.levels.shape[1]

    def point(self, L: np.ndarray) -> np.ndarray:
        """(width, ...) levels -> (...) point indices."""
        u = np.zeros(L.shape[1:], dtype=np.int64)
        for i in range(self.width):
            u |= L[i].astype(np.int64) << (self.bits * i)
        return u


@cache
def grid_tables(qtype: T) -> GridTables:
    if qtype == T.IQ1_M:  # IQ1_S's grid and search
        return grid_tables(T.IQ1_S)
    cls = _CLASS[qtype]
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), values).astype(np.int8)
    bits, n_points, nwant = _SEARCH[qtype]
    width = levels.shape[1]
    kmap = np.full(n_points, -1, dtype=np.int32)
    packed = np.zeros(len(levels), dtype=np.int64)
    for i in range(width):
        packed |= levels[:, i].astype(np.int64) << (bits * i)
    kmap[packed] = np.arange(len(levels), dtype=np.int32)
    off = np.flatnonzero(kmap < 0)
    pos = 2 * ((off[:, None] >> (bits * np.arange(width))) & ((1 << bits) - 1)) + 1  # (n_off, width)
    q = 2 * levels.astype(np.int64) + 1  # (G, width)
    lists = []
    for s in range(0, len(off), 2048):
        p = pos[s:s + 2048]
        d2 = (p * p).sum(1)[:, None] + (q * q).sum(1)[None, :] - 2 * p @ q.T  # exact: small integers
        order = np.argsort(d2, axis=1, kind="stable")  # by distance, then grid index (qsort's compare)
        ranked = np.take_along_axis(d2, order, axis=1)
        distinct = np.concatenate([np.zeros((len(p), 1), np.int64), np.cumsum(np.diff(ranked, axis=1) > 0, 1)], 1)
        lists.extend(o[r < nwant] for o, r in zip(order, distinct))
    count = np.zeros(n_points, dtype=np.int64)
    count[off] = [len(x) for x in lists]
    start = np.cumsum(count) - count
    return GridTables(levels, kmap, start, count, np.concatenate(lists).astype(np.int32), bits)


def best_neighbours(tables: GridTables, u: np.ndarray, xval: np.ndarray, weight: np.ndarray,
                    scale: np.ndarray, level_values: np.ndarray | None = None) -> np.ndarray:
    """ggml's find_best_neighbour for m off-grid vectors at once: u (m,) their points, xval and
    weight (m, width), scale (m,) -> (m,) the grid index of the candidate with the least
    sum_i weight_i (scale q_i - xval_i)^2, summed in order in float32 (q = 2l + 1, or with
    level_values IQ1's value of level l: iq1_find_best_neighbour2); the first of equals, as
    `d2 < best_d2` keeps it (a NaN or infinite distance never wins). The candidates of all m
    are one flat run (their counts differ: 1 to 292)."""
    count = tables.count[u]
    first = np.cumsum(count) - count  # each vector's first place in the run
    owner = np.repeat(np.arange(len(u)), count)
    at = (tables.start[u] - first).take(owner)
    at += np.arange(at.size)  # places in tables.flat
    if level_values is None:
        q = tables.flat_q.take(at, axis=0)  # (run, width)
    else:
        q = level_values[tables.levels[tables.flat.take(at)]]
    diff = scale.take(owner)[:, None] * q
    diff -= xval.take(owner, axis=0)
    t = weight.take(owner, axis=0) * diff
    t *= diff
    d2 = t[:, 0].copy()  # 0 + the first term: the first term
    for i in range(1, tables.width):
        d2 += t[:, i]
    d2[~(d2 < np.finfo(np.float32).max)] = np.inf
    hits = np.flatnonzero(d2 == np.minimum.reduceat(d2, first).take(owner))
    keep = np.ones(hits.size, dtype=bool)
    keep[1:] = owner[hits[1:]] != owner[hits[:-1]]  # the first of each vector's equals
    return tables.flat.take(at[hits[keep]])
