"""Round-to-nearest encoders for llama.cpp's grid types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S,
IQ3_XXS, IQ3_S), in the layouts runtime/iq_grids.py documents. Not ggml's searches (those are
convert/quant's grid_fit.py and iq1.py, far slower): each scale group's scale maps its largest |w| to the largest level, each
8 (IQ3: 4) weights take the nearest grid vector to their magnitudes (IQ1: to w / dl less the
nearer of the two deltas), and where a type stores 7 sign bits for 8 weights (the 8th is their
parity) an odd count of negatives flips the sign of the group's smallest |w|, as ggml does.
For test models and test rows whose bytes every decoder of qvl's must read alike."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from qvl.runtime.iq_grids import SCALE_GROUP, grid

# per type: largest |v| (iq_grids' integer levels), scale = d * (2 ls + 1) / DIV
TOP = {T.IQ2_XXS: 43, T.IQ2_XS: 43, T.IQ2_S: 43, T.IQ3_XXS: 62, T.IQ3_S: 15, T.IQ1_S: 9, T.IQ1_M: 9}
DIV = {T.IQ2_XXS: 8, T.IQ2_XS: 8, T.IQ2_S: 8, T.IQ3_XXS: 4, T.IQ3_S: 1, T.IQ1_S: 8, T.IQ1_M: 8}
KSIGNS = (T.IQ2_XXS, T.IQ2_XS, T.IQ3_XXS)


def _nearest(target: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """target (n, width) -> the index of the nearest grid row for each, and its squared error."""
    index = np.empty(len(target), dtype=np.int64)
    err = np.empty(len(target), dtype=np.float32)
    norms = (grid * grid).sum(1)
    for s in range(0, len(target), 4096):
        t = target[s:s + 4096]
        dist = norms[None, :] - 2 * t @ grid.T
        index[s:s + 4096] = dist.argmin(1)
        err[s:s + 4096] = ((t - grid[index[s:s + 4096]]) ** 2).sum(1)
    return index, err


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), dtype=np.float32), where=b > 0)


def encode_grid(w: np.ndarray, qtype: T) -> np.ndarray:
    """(n, k) float32 rows -> (n, k / 256 * block bytes) uint8 blocks of `qtype`."""
    n, k = w.shape
    nb, group = k // 256, SCALE_GROUP[qtype]
    top_ls = 7 if qtype in (T.IQ1_S, T.IQ1_M) else 15
    b = w.reshape(n, nb, 256 // group, group).astype(np.float32)
    want = np.abs(b).max(-1) / TOP[qtype]  # (n, nb, groups) scale in v units
    d = (want.max(-1) * DIV[qtype] / (2 * top_ls + 1)).astype(np.float16)  # (n, nb)
    d32 = d.astype(np.float32)[..., None]
    ls = np.clip(np.round((_ratio(want * DIV[qtype], d32) - 1) / 2), 0, top_ls).astype(np.int64)
    scale = d32 * (2 * ls + 1) / DIV[qtype]
    t = _ratio(b, scale[..., None]).reshape(n, nb, 256)  # w in v units
    table = grid(qtype).numpy().astype(np.float32)
    width = table.shape[1]
    if qtype in (T.IQ1_S, T.IQ1_M):
        chunks = t.reshape(-1, 8)
        up, err_up = _nearest((chunks - 1) / 8, table)  # v = 8g + 1
        down, err_down = _nearest((chunks + 1) / 8, table)  # v = 8g - 1
        if qtype == T.IQ1_S:  # one delta a 32-weight group: the sum of its 4 grids' errors
            minus = np.repeat(err_down.reshape(-1, 4).sum(1) < err_up.reshape(-1, 4).sum(1), 4)
        else:
            minus = err_down < err_up
        index = np.where(minus, down, up).reshape(n, nb, 32)
        return _pack_iq1(qtype, d, ls, index, minus.reshape(n, nb, 32))
    negative = t < 0
    a = np.abs(t)
    if qtype in KSIGNS:  # an even count of negatives in every 8: flip the smallest |w|'s sign where odd
        g8 = negative.reshape(-1, 8)
        odd = g8.sum(1) % 2 == 1
        smallest = a.reshape(-1, 8).argmin(1)
        g8[odd, smallest[odd]] ^= True
        negative = g8.reshape(n, nb, 256)
    index = _nearest(a.reshape(-1, width), table)[0].reshape(n, nb, 256 // width)
    signs = np.packbits(negative.reshape(n, nb, 32, 8), axis=-1, bitorder="little")[..., 0]  # (n, nb, 32)
    return _pack_signed(qtype, d, ls, index, signs)


def _words(x: np.ndarray, dtype: type) -> np.ndarray:
    """Integers (..., m) -> their little-endian bytes (..., m * size) as `dtype` words."""
    return np.ascontiguousarray(x.astype(dtype)).view(np.uint8)


def _pack_signed(qtype: T, d: np.ndarray, ls: np.ndarray, index: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """The IQ2 / IQ3 blocks of super-scales d (n, nb), scales ls, grid indices and sign bytes
    (n, nb, 32: bit j for weight j of 8)."""
    n, nb = d.shape
    head = d[..., None].view(np.uint8)
    if qtype in (T.IQ2_XXS, T.IQ3_XXS):
        sidx = (signs & 127).astype(np.uint32).reshape(n, nb, 8, 4)
        aux = (sidx[..., 0] | sidx[..., 1] << 7 | sidx[..., 2] << 14 | sidx[..., 3] << 21
               | ls.astype(np.uint32) << 28)  # (n, nb, 8)
        if qtype == T.IQ2_XXS:
            idx = index.astype(np.uint8).reshape(n, nb, 8, 4)
            body = np.concatenate([idx, aux[..., None].view(np.uint8)], -1).reshape(n, nb, 64)
        else:
            body = np.concatenate([index.astype(np.uint8), _words(aux, np.uint32)], -1)
    elif qtype == T.IQ2_XS:
        nib = ls.astype(np.uint8)
        body = np.concatenate([_words(index | (signs & 127).astype(np.int64) << 9, np.uint16),
                               nib[..., 0::2] | nib[..., 1::2] << 4], -1)
    elif qtype == T.IQ2_S:
        high = (index >> 8).reshape(n, nb, 8, 4)
        qh = (high[..., 0] | high[..., 1] << 2 | high[..., 2] << 4 | high[..., 3] << 6).astype(np.uint8)
        nib = ls.astype(np.uint8)
        body = np.concatenate([(index & 255).astype(np.uint8), signs, qh, nib[..., 0::2] | nib[..., 1::2] << 4], -1)
    else:  # IQ3_S
        qh = np.packbits((index >> 8).astype(bool).reshape(n, nb, 8, 8), axis=-1, bitorder="little")[..., 0]
        nib = ls.astype(np.uint8)
        body = np.concatenate([(index & 255).astype(np.uint8), qh, signs, nib[..., 0::2] | nib[..., 1::2] << 4], -1)
    return np.concatenate([head, body], -1).reshape(n, -1)


def _pack_iq1(qtype: T, d: np.ndarray, ls: np.ndarray, index: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """IQ1_S / IQ1_M blocks of d (n, nb), ls, grid indices and delta signs (n, nb, 32)."""
    n, nb = d.shape
    if qtype == T.IQ1_S:
        high = (index >> 8).reshape(n, nb, 8, 4)
        qh = (high[..., 0] | high[..., 1] << 3 | high[..., 2] << 6 | high[..., 3] << 9 | ls << 12
              | minus.reshape(n, nb, 8, 4)[..., 0].astype(np.int64) << 15)
        return np.concatenate([d[..., None].view(np.uint8), (index & 255).astype(np.uint8), _words(qh, np.uint16)],
                              -1).reshape(n, -1)
    nib = (index >> 8) | minus.astype(np.int64) << 3  # (n, nb, 32)
    qh = (nib[..., 0::2] | nib[..., 1::2] << 4).astype(np.uint8)
    l4 = ls.reshape(n, nb, 4, 4)
    d16 = d.view(np.uint16).astype(np.int64)
    d_nibbles = (d16[..., None] >> (4 * np.arange(4))) & 15  # d's bits 4t..4t+3 atop word t
    sc = l4[..., 0] | l4[..., 1] << 3 | l4[..., 2] << 6 | l4[..., 3] << 9 | d_nibbles << 12
    return np.concatenate([(index & 255).astype(np.uint8), qh, _words(sc, np.uint16)], -1).reshape(n, -1)
