"""ggml's IQ2_XXS, IQ2_XS and IQ2_S blocks (the layouts of `quantize_row_iq2_xxs_impl`,
`_iq2_xs_impl` and `_iq2_s_impl`; their search: grid_fit.py). IQ2_XXS and IQ2_XS exist only
with an importance matrix (ggml asserts one); IQ2_S also without.

    IQ2_XXS (66 B a 256): f16 d | 8 x (u8 index[4]: a 256-grid vector a 8 weights | u32 aux:
        four 7-bit sign indices, ls at bits 28-31), one pair a 32-weight sub-block.
    IQ2_XS (74 B): f16 d | u16 qs[32]: a 512-grid index (bits 0-8) and its 7 sign bits (9-15) a
        8 weights | scales[8]: a 4-bit ls a 16 weights, low nibble first.
    IQ2_S (82 B): f16 d | qs[32]: the 1024-grid index's low byte | signs[32] (a bit a weight) |
        qh[8]: the index's bits 8-9, four a byte | scales[8].
w = d (2 ls + 1) / 8 * grid * sign for all three (stored d: IQ2_S's times 0.9875).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .common import u16_bytes, u32_bytes
from .grid_fit import FITS, block_scales, fit_subblocks, nibble_pairs


def quantize_iq2_xxs(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 and importance values -> (nb, 66) uint8."""
    nb, fit = x.shape[0], FITS[T.IQ2_XXS]
    f = fit_subblocks(x, qw, fit)
    aux = f.sign_words()
    dh, ls, empty = block_scales(f.scale.reshape(nb, 8), fit.fudge)
    aux = (aux.reshape(nb, 8) | (ls.astype(np.uint32) << 28)).reshape(-1)
    index = f.grid_indices(fit.tables).astype(np.uint8)  # (n, 4)
    pairs = np.concatenate([index, u32_bytes(aux)], axis=1).reshape(nb, 64)
    out = np.concatenate([u16_bytes(dh), pairs], axis=1)
    out[empty] = 0
    return out


def quantize_iq2_xs(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 and importance values -> (nb, 74) uint8."""
    nb, fit = x.shape[0], FITS[T.IQ2_XS]
    f = fit_subblocks(x, qw, fit)
    qs = f.grid_indices(fit.tables) | f.sign_bits(parity=True) << 9  # (n, 2)
    dh, ls, empty = block_scales(f.scale.reshape(nb, 16), fit.fudge)
    out = np.concatenate([u16_bytes(dh), u16_bytes(qs.reshape(-1)).reshape(nb, 64), nibble_pairs(ls)], axis=1)
    out[empty] = 0
    return out


def quantize_iq2_s(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 82) uint8."""
    nb, fit = x.shape[0], FITS[T.IQ2_S]
    f = fit_subblocks(x, qw, fit)
    index = f.grid_indices(fit.tables).reshape(nb, 32)
    signs = f.sign_bits(parity=False).reshape(nb, 32).astype(np.uint8)
    qh = ((index >> 8).reshape(nb, 8, 4) << (2 * np.arange(4))).sum(2).astype(np.uint8)
    dh, ls, empty = block_scales(f.scale.reshape(nb, 16), fit.fudge)
    out = np.concatenate([u16_bytes(dh), (index & 255).astype(np.uint8), signs, qh, nibble_pairs(ls)], axis=1)
    out[empty] = 0
    return out
