"""llama.cpp's grid types read in Triton: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.

These code 8 weights (IQ3: 4) by an index into a fixed table of level vectors, with a sign a
weight and a scale per 16 or 32 weights (layouts: runtime/iq_grids.py). The kernels read them
from their blocks like the other types (qblocks.py), looking levels up in one byte table on the
GPU (`grid_table`, 33 KB, every type's grid at GRID_OFFSET: L1 / L2 resident; a kernel gets a
pointer to its type's, `type_grid`), working the sign bits out of the 7-bit sign indices (bit 7
is their parity) instead of a second table, and making levels and scales floats by magic-float
subtraction (no int-to-float conversion) and signs by an xor of the sign bit.

`decode_grid` gives the weights of chunks c (0..31: 8 weights each, of a 256-weight block) at
positions j (0..7) within them, for any broadcastable shapes of c and j. Both the tiled GEMM
(c = e // 8, j = e % 8 of its element indices) and the GEMV (qgemv_steps.py: a (rows, 32, 8)
tile) pass full-shaped indices, so that every field is decoded per weight in the weights' own
layout: a chunk's fields computed once in a (rows, 32, 1) layout and broadcast cost the GEMV
8-34 barriers a step (layout changes through shared memory) and more instructions in all.
Torch reference: gguf-py's `dequantize` (the module's tests, tests/kernels).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from ..runtime.iq_grids import grid

GRID_IDS = {T.IQ2_XXS: 12, T.IQ2_XS: 13, T.IQ2_S: 14, T.IQ3_XXS: 15, T.IQ3_S: 16, T.IQ1_S: 17, T.IQ1_M: 18}
# byte offset of each grid in grid_table, by kernel QTYPE id; IQ1_S and IQ1_M share theirs
GRID_OFFSET = {12: 0, 13: 2048, 14: 6144, 15: 14336, 16: 15360, 17: 17408, 18: 17408}
_tables: dict[torch.device, torch.Tensor] = {}
_views: dict[tuple[T, torch.device], torch.Tensor] = {}  # type_grid's, made once: it runs every matmul


def grid_bytes() -> np.ndarray:
    """Every grid's level vectors as bytes, concatenated at GRID_OFFSET (IQ1's -1 / 0 / 1 stored
    plus 1)."""
    parts = []
    for qtype, qid in GRID_IDS.items():
        if qtype != T.IQ1_M:  # IQ1_S's grid
            assert sum(len(p) for p in parts) == GRID_OFFSET[qid]
            levels = grid(qtype).numpy().reshape(-1)
            parts.append((levels + (1 if qtype == T.IQ1_S else 0)).astype(np.uint8))
    return np.concatenate(parts)


def grid_table(device: torch.device | str) -> torch.Tensor:
    """grid_bytes on `device`, made once per device (before a CUDA graph is captured: the
    weights' upload asks for it)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one table a GPU, however it is named
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _tables:
        _tables[device] = torch.from_numpy(grid_bytes()).to(device)
    return _tables[device]


def type_grid(qtype: T, device: torch.device | str, other: torch.Tensor) -> torch.Tensor:
    """The part of grid_table that `qtype`'s kernels read (a view: its grid first); `other`
    (a pointer the kernels never read) for the types that are not grid types."""
    if qtype not in GRID_IDS:
        return other
    key = (qtype, device if isinstance(device, torch.device) else torch.device(device))
    if key not in _views:
        _views[key] = grid_table(device)[GRID_OFFSET[GRID_IDS[qtype]]:]
    return _views[key]


@triton.jit
def _u16(ptr):
    """The little-endian uint16 at an even byte pointer, as int32."""
    return tl.load(ptr.to(tl.pointer_type(tl.int16))).to(tl.int32) & 0xFFFF


@triton.jit
def _u32(ptr):
    """The little-endian 32 bits at an even (not necessarily 4-aligned) byte pointer, as int32."""
    return _u16(ptr) | (_u16(ptr + 2) << 16)


@triton.jit
def _f16(ptr):
    """The float16 at an even byte pointer, as float32."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _byte(ptr):
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _float(v):
    """Integers 0 <= v < 2^23 as float32, exactly, without an int-to-float conversion (a
    quarter of the FMA rate or less): the magic float 2^23 + v less 2^23."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _negate(w, neg):
    """w with its sign flipped where neg (0 or 1) is 1: one xor of the sign bit."""
    return (w.to(tl.int32, bitcast=True) ^ (neg << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _sign_bit(s, j):
    """Whether weight j of the 8 a 7-bit sign index s covers is negative (0 / 1): bit j of s,
    bit 7 s's parity."""
    p = s ^ (s >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return tl.where(j == 7, p, s >> j) & 1


@triton.jit
def _nibble(ptr, which):
    """Nibble `which` (0: low, 1: high) of the byte at ptr."""
    return (_byte(ptr) >> (4 * which)) & 15


@triton.jit
def decode_grid(row, g_ptr, c, j, QTYPE: tl.constexpr):
    """Weights of chunks c at positions j of the blocks at byte pointers `row` (broadcast
    together), float32. QTYPE: GRID_IDS of the type; g_ptr: its grid (`type_grid`)."""
    if QTYPE == 18:  # IQ1_M: qs[32] | qh[16] | u16 sc[4] (d in the top nibbles)
        nib = _nibble(row + 32 + c // 2, c % 2)
        index = _byte(row + c) | ((nib & 7) << 8)
        delta = tl.where((nib & 8) != 0, -0.125, 0.125)
        ls = (_u16(row + 48 + 2 * (c // 8)) >> (3 * ((c // 2) % 4))) & 7
        w0 = _u16(row + 48 + 0 * c)
        w1 = _u16(row + 50 + 0 * c)
        w2 = _u16(row + 52 + 0 * c)
        w3 = _u16(row + 54 + 0 * c)
        d16 = (w0 >> 12) | ((w1 >> 8) & 0xF0) | ((w2 >> 4) & 0xF00) | (w3 & 0xF000)
        d = d16.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        g = _float(_byte(g_ptr + index * 8 + j)) - 1.0
        w = d * _float(2 * ls + 1) * (g + delta)
    else:
        d = _f16(row + 0 * c)
        if QTYPE == 17:  # IQ1_S: d | qs[32] | u16 qh[8]
            qh = _u16(row + 34 + 2 * (c // 4))
            index = _byte(row + 2 + c) | (((qh >> (3 * (c % 4))) & 7) << 8)
            delta = tl.where((qh & 0x8000) != 0, -0.125, 0.125)
            g = _float(_byte(g_ptr + index * 8 + j)) - 1.0
            w = d * _float(2 * ((qh >> 12) & 7) + 1) * (g + delta)
        elif QTYPE == 15 or QTYPE == 16:  # IQ3: two 4-weight grids a chunk, grid k = 2c + j // 4
            k = 2 * c + j // 4
            if QTYPE == 15:  # IQ3_XXS: d | qs[64] | u32 aux[8]
                index = _byte(row + 2 + k)
                aux = _u32(row + 66 + 4 * (c // 4))
                neg = _sign_bit((aux >> (7 * (c % 4))) & 127, j)
                scale = d * _float(2 * ((aux >> 28) & 15) + 1) * 0.25
            else:  # IQ3_S: d | qs[64] | qh[8] | signs[32] | scales[4]
                index = _byte(row + 2 + k) | (((_byte(row + 66 + k // 8) >> (k % 8)) & 1) << 8)
                neg = (_byte(row + 74 + c) >> j) & 1
                scale = d * _float(2 * _nibble(row + 106 + c // 8, (c // 4) % 2) + 1)
            w = _negate(scale * _float(_byte(g_ptr + index * 4 + j % 4)), neg)
        else:  # IQ2: d | ...
            if QTYPE == 12:  # IQ2_XXS: 8 x (u8 index[4], u32 aux)
                index = _byte(row + 2 + 8 * (c // 4) + c % 4)
                aux = _u32(row + 6 + 8 * (c // 4))
                neg = _sign_bit((aux >> (7 * (c % 4))) & 127, j)
                ls = (aux >> 28) & 15
            elif QTYPE == 13:  # IQ2_XS: u16 qs[32] | scales[8]
                q = _u16(row + 2 + 2 * c)
                index = q & 511
                neg = _sign_bit(q >> 9, j)
                ls = _nibble(row + 66 + c // 4, (c // 2) % 2)
            else:  # IQ2_S: qs[32] | signs[32] | qh[8] | scales[8]
                index = _byte(row + 2 + c) | (((_byte(row + 66 + c // 4) >> (2 * (c % 4))) & 3) << 8)
                neg = (_byte(row + 34 + c) >> j) & 1
                ls = _nibble(row + 74 + c // 4, (c // 2) % 2)
            scale = d * _float(2 * ls + 1) * 0.125
            w = _negate(scale * _float(_byte(g_ptr + index * 8 + j)), neg)
    return w
