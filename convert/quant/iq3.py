"""ggml's IQ3_XXS and IQ3_S blocks (the layouts of `quantize_row_iq3_xxs_impl` and
`quantize_row_iq3_s_impl`; their search: grid_fit.py), with and without an importance matrix.

    IQ3_XXS (98 B a 256): f16 d | u8 qs[64]: a 256-grid index a 4 weights | u32 aux[8], one a
        32-weight sub-block: four 7-bit sign indices (8 weights each, their parity the 8th sign)
        and the sub-block's scale ls at bits 28-31; w = d (2 ls + 1) / 4 * grid * sign.
    IQ3_S (110 B): f16 d | qs[64] | qh[8] (bit 8 of sub-block ib's index k: bit k of qh[ib]) |
        signs[32] (a bit a weight) | scales[4] (two 4-bit ls); w = d (2 ls + 1) * grid * sign.

ggml's quirk kept: an all-zero IQ3_S sub-block does not advance its qs and signs, so the
sub-blocks after it write one place earlier (their qh bits stay in place).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .common import u16_bytes, u32_bytes
from .grid_fit import FITS, block_scales, fit_subblocks, nibble_pairs


def quantize_iq3_xxs(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 98) uint8."""
    nb, fit = x.shape[0], FITS[T.IQ3_XXS]
    f = fit_subblocks(x, qw, fit)
    aux = f.sign_words()
    dh, ls, empty = block_scales(f.scale.reshape(nb, 8), fit.fudge)
    aux = aux.reshape(nb, 8) | (ls.astype(np.uint32) << 28)
    qs = f.grid_indices(fit.tables).reshape(nb, 64).astype(np.uint8)
    out = np.concatenate([u16_bytes(dh), qs, u32_bytes(aux.reshape(-1)).reshape(nb, 32)], axis=1)
    out[empty] = 0
    return out


def quantize_iq3_s(x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 110) uint8."""
    nb, fit = x.shape[0], FITS[T.IQ3_S]
    f = fit_subblocks(x, qw, fit)
    index = f.grid_indices(fit.tables).reshape(nb, 8, 8)
    live = f.live.reshape(nb, 8)
    qh = ((index >> 8) << np.arange(8)).sum(2).astype(np.uint8)
    slot = np.cumsum(live, axis=1) - 1  # a dead sub-block's place goes to the live ones after it
    qs = np.zeros((nb, 8, 8), dtype=np.uint8)
    signs = np.zeros((nb, 8, 4), dtype=np.uint8)
    b, ib = np.nonzero(live)
    qs[b, slot[b, ib]] = (index[b, ib] & 255).astype(np.uint8)
    signs[b, slot[b, ib]] = f.sign_bits(parity=False).reshape(nb, 8, 4)[b, ib]
    dh, ls, empty = block_scales(f.scale.reshape(nb, 8), fit.fudge)
    out = np.concatenate([u16_bytes(dh), qs.reshape(nb, 64), qh, signs.reshape(nb, 32), nibble_pairs(ls)], axis=1)
    out[empty] = 0
    return out
