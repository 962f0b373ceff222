"""llama.cpp's grid types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) read as integers.

Each of these codes 8 (IQ3: 4) weights at a time by an index into a fixed grid of level
vectors, plus a sign per weight, and scales them per 16 or 32 weights. `grid_fields` turns
their blocks (256 weights) into one signed integer v per weight and a float scale per sub-block,
w = v * scale, exactly (every scale below is the product ggml forms, times a power of two):

  type (bytes)     per 256 weights                                  v                scale, per
  IQ2_XXS (66)     f16 d | 8 x (u8 grid[4], u32 aux): 4 indices,      level * sign     d(2ls+1)/8, 32
                   7-bit sign indices at 7l, ls at bits 28-31 of aux  (levels 8, 25, 43)
  IQ2_XS (74)      f16 d | u16 qs[32]: index bits 0-8, sign index      level * sign     d(2ls+1)/8, 16
                   9-15 | ls[16] as nibbles (low first)
  IQ2_S (82)       f16 d | qs[32] | signs[32] (a bit a weight) | qh[8] level * sign     d(2ls+1)/8, 16
                   (index bits 8-9, 2 a grid) | ls[16] as nibbles
  IQ3_XXS (98)     f16 d | qs[64] (4-weight grid indices) | 8 x u32:   level * sign     d(2ls+1)/4, 32
                   7-bit sign indices (8 weights each), ls at 28-31   (levels 4 .. 62)
  IQ3_S (110)      f16 d | qs[64] | qh[8] (index bit 8) | signs[32] |  level * sign     d(2ls+1), 32
                   ls[8] as nibbles                                   (levels 1 .. 15)
  IQ1_S (50)       f16 d | qs[32] | u16 qh[8]: index bits 8-10 at 3l,  8g + 1 or 8g - 1  d(2ls+1)/8, 32
                   ls at 12-14, the delta's sign at 15                (g in -1, 0, 1)
  IQ1_M (56)       qs[32] | qh[16]: a nibble a grid (index bits 8-10,  8g + 1 or 8g - 1  d(2ls+1)/8, 16
                   the delta's sign: bit 3) | u16 sc[4]: 3-bit ls at
                   3j, d's 16 bits in the top nibbles

Sign indices (IQ2_XXS, IQ2_XS, IQ3_XXS) pick one of 128 sign bytes (ggml's ksigns_iq2xs: the
index with its parity as bit 7), bit j for weight j of the 8. IQ1's w = dl * (g +- 1/8) becomes
v = 8g +- 1 with scale dl / 8. |v| <= 62 for all of them. Torch reference: gguf-py's `dequantize`.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants

GRID_TYPES = (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M)
SCALE_GROUP = {T.IQ2_XXS: 32, T.IQ2_XS: 16, T.IQ2_S: 16, T.IQ3_XXS: 32, T.IQ3_S: 32, T.IQ1_S: 32, T.IQ1_M: 16}
_GRID_CLASS = {T.IQ2_XXS: quants.IQ2_XXS, T.IQ2_XS: quants.IQ2_XS, T.IQ2_S: quants.IQ2_S, T.IQ3_XXS: quants.IQ3_XXS,
               T.IQ3_S: quants.IQ3_S, T.IQ1_S: quants.IQ1_S, T.IQ1_M: quants.IQ1_M}


@cache
def grid(qtype: T) -> torch.Tensor:
    """The type's level vectors (entries, 8 or 4) int16, from gguf-py's tables."""
    cls = _GRID_CLASS[qtype]
    cls.init_grid()
    return torch.from_numpy(np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)).to(torch.int16)


@cache
def sign_bytes() -> torch.Tensor:
    """ggml's ksigns_iq2xs (128,) uint8: sign index -> 8 sign bits."""
    return torch.from_numpy(np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).copy())


def f16_field(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian halves -> float32 (...)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _words(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., 2n or 4n) uint8 little-endian -> int32 (..., n) of their 16- or 32-bit words (16-bit
    ones unsigned)."""
    w = b.contiguous().view(dtype).to(torch.int32)
    return w & 0xFFFF if dtype == torch.int16 else w


def _bits(b: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 8n) uint8 of their bits, least significant first."""
    return ((b[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) int32, low nibble first."""
    b = b.to(torch.int32)
    return torch.stack([b & 15, b >> 4], -1).flatten(-2)


def _apply_signs(levels: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """levels, negative: (R, K) -> levels with the flagged ones negated."""
    return levels * (1 - 2 * negative.to(levels.dtype))


def grid_fields(raw: torch.Tensor, qtype: T) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, nb * block bytes) uint8 rows of a GRID_TYPES type -> v (R, K) int16 and scale
    (R, K / SCALE_GROUP) float32: w = v * scale (the module's table)."""
    R = raw.shape[0]
    b = raw.reshape(R, -1, GGML_QUANT_SIZES[qtype][1])
    table = grid(qtype)
    if qtype == T.IQ2_XXS or qtype == T.IQ3_XXS:
        if qtype == T.IQ2_XXS:
            pairs = b[..., 2:66].reshape(R, -1, 8, 8)  # (R, nb, sub-block, 8 bytes)
            index, aux = pairs[..., :4], _words(pairs[..., 4:], torch.int32)[..., 0]
        else:
            index, aux = b[..., 2:66].reshape(R, -1, 8, 8), _words(b[..., 66:98], torch.int32)
        sign_index = (aux[..., None] >> (7 * torch.arange(4))) & 127  # (R, nb, 8, 4): 8 weights each
        negative = _bits(sign_bytes()[sign_index.int()]).reshape(R, -1)
        ls = (aux >> 28) & 15
        scale = f16_field(b[..., 0:2])[..., None] * (2 * ls + 1) / (8 if qtype == T.IQ2_XXS else 4)
    elif qtype == T.IQ2_XS:
        qs = _words(b[..., 2:66], torch.int16)  # (R, nb, 32)
        index = qs & 511
        negative = _bits(sign_bytes()[(qs >> 9).int()]).reshape(R, -1)
        scale = f16_field(b[..., 0:2])[..., None] * (2 * _nibbles(b[..., 66:74]) + 1) / 8
    elif qtype == T.IQ2_S:
        qh = b[..., 66:74].to(torch.int32)
        index = b[..., 2:34].to(torch.int32) | ((((qh[..., None] >> (2 * torch.arange(4))) & 3) << 8).flatten(-2))
        negative = _bits(b[..., 34:66]).reshape(R, -1)
        scale = f16_field(b[..., 0:2])[..., None] * (2 * _nibbles(b[..., 74:82]) + 1) / 8
    elif qtype == T.IQ3_S:
        index = b[..., 2:66].to(torch.int32) | (_bits(b[..., 66:74]).to(torch.int32) << 8)
        negative = _bits(b[..., 74:106]).reshape(R, -1)
        scale = f16_field(b[..., 0:2])[..., None] * (2 * _nibbles(b[..., 106:110]) + 1)
    else:
        return _iq1_fields(b, qtype, table)
    levels = table[index.int()].reshape(R, -1)
    return _apply_signs(levels, negative), scale.reshape(R, -1)


def _iq1_fields(b: torch.Tensor, qtype: T, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ1_S / IQ1_M blocks (R, nb, size) -> grid_fields' (v, scale)."""
    R = b.shape[0]
    if qtype == T.IQ1_S:
        qh = _words(b[..., 34:50], torch.int16)  # (R, nb, 8): one a 32-weight sub-block
        high = ((qh[..., None] >> (3 * torch.arange(4))) & 7).flatten(-2)  # (R, nb, 32)
        index = b[..., 2:34].to(torch.int32) | (high << 8)
        minus = ((qh >> 15) & 1)[..., None].expand(*qh.shape, 4).flatten(-2)  # the delta's sign, per grid
        ls = (qh >> 12) & 7
        d = f16_field(b[..., 0:2])[..., None]
    else:
        nib = _nibbles(b[..., 32:48])  # (R, nb, 32): one a grid
        index = b[..., 0:32].to(torch.int32) | ((nib & 7) << 8)
        minus = nib >> 3
        sc = _words(b[..., 48:56], torch.int16)  # (R, nb, 4)
        ls = ((sc[..., None] >> (3 * torch.arange(4))) & 7).flatten(-2)  # (R, nb, 16)
        top = sc >> 12
        d16 = top[..., 0] | top[..., 1] << 4 | top[..., 2] << 8 | top[..., 3] << 12
        d = d16.to(torch.int16).view(torch.float16).float()[..., None]
    g = table[index.int()]  # (R, nb, 32, 8)
    v = 8 * g + (1 - 2 * minus.to(torch.int16))[..., None]
    return v.reshape(R, -1), (d * (2 * ls + 1) / 8).reshape(R, -1)
