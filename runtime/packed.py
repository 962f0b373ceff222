"""The CPU fast path: GGUF blocks repacked once into torch's int4 matmul layout.

`torch._weight_int4pack_mm_for_cpu` multiplies bf16 activations by 4-bit weights stored as
`w = (q - 8) * scale + zero` with one (scale, zero) per 32 weights of a row. GGUF's 4-bit types
map onto that exactly (up to bf16 rounding of scale and zero):

- Q4_K: sub-block scale d*sc and min dmin*m: scale = d*sc, zero = 8*scale - dmin*m.
- Q4_0: scale = d, zero = 0.  Q4_1: scale = d, zero = 8*d + m.
- Q6_K: q = lo + 16*hi has 6 bits and one scale per 16 weights. Each 16-weight sub-block becomes
  one 32-group [lo(16), 2*hi + 5 (16)] with scale s = d*sc and zero 0, and the activations are
  doubled to match, [x, 8*x] per sub-block: (lo - 8)*s*x + (2*hi + 5 - 8)*s*8x
  = (lo + 16*hi - 32)*s*x, exactly. Twice the int4 work of Q4_K, ~2x faster than bf16 weights.
- Q5_K: Q4_K's scales and nibbles, a fifth bit hb on top. Each 32-weight sub-block becomes two
  32-groups, [lo (32)] with Q4_K's scale and zero and [2*hb + 8 (32)] with the same scale and
  zero 0, against [x, 8*x]: (lo - 8)*s*x + zero*x + 2*hb*s*8x = (s*(lo + 16*hb) - min)*x.
  Q5_0 / Q5_1 the same on Q4_0's / Q4_1's codes and scales (zero 8*d - 16*d / 8*d + m).
- Q8_0: u = v + 128 = lo + 16*hi (0..255) per 32-weight block becomes [lo (32)] with scale d and
  zero 8*d and [hi (32)] with scale d and zero 0, against [x, 16*x]: (lo - 8)*d*x + 8*d*x +
  (hi - 8)*d*16x = (u - 128)*d*x = v*d*x, exactly. 1.25 bytes a weight instead of bf16's 2.
- Integer levels: IQ4_NL / IQ4_XS (4-bit codes of 16 non-linear levels, -127..113) and the grid
  types IQ1_S ... IQ3_S (iq_grids.py: levels of up to +-62), w = v * s with a scale s per
  `half` = 16 or 32 weights (IQ4_NL: d; IQ4_XS: d * (ls - 32); grid types: SCALE_GROUP). With
  u = v + 136 = lo + 16*hi (9..249), each `half` weights become [lo (half), hi (half)] with scale
  s and zero 0 (one 32-group, or two where half is 32), against [x, 16*x]:
  (lo - 8)*s*x + (hi - 8)*s*16x = (u - 136)*s*x, exactly.
- IQ3_S and IQ1_S, whose levels are a uniform 4-bit code: IQ3_S's v are the odd numbers -15..15, so
  q = (v + 15) / 2 in 0..15 with scale 2s and zero s; IQ1_S's v = 8g + o with g in -1..1 and one
  o = +-1 per 32 weights (its delta), so q = g + 8 with scale 8s and zero o*s. One 32-group per
  32 weights, as Q4_K: half the int4 work and memory of the doubled layout.
- Q3_K / Q2_K: 3- / 2-bit codes q with a scale (Q2_K: and a min) per 16 weights, w = q*s + offset
  (Q3_K: offset -4s; Q2_K: -min). Each 16-weight sub-block becomes one 32-group [q + 8 (16),
  8 (16)] with zero = offset, against [x, 0]: the second half is padding the op multiplies by 0.
  (Codes q with zero 8*s + offset would round a zero up to 8/3 of the weights' size to bf16.)

The int4 op is the fastest for few rows of x (decode: 4.7x bf16 weights at one row, for a
fraction of their memory) but does about 2.6x the work of a bf16 GEMM per row; from
DENSE_FROM_M rows on (prefill chunks), a call decodes TILE_ROWS weight rows at a time back to
bf16 (float32 arithmetic, one rounding) and runs bf16 GEMMs on them: 2-3x faster at 512 rows,
with one tile of extra memory (scripts/bench_packed.py). On CPUs without native bf16 GEMMs
(cpu_gemm.py: AVX2) the GEMMs run in float32, from DENSE_FROM_M_F32 rows, on bf16 tiles widened
and x rounded to bf16, their products rounded to bf16: a bf16 GEMM's numbers, so that every CPU
gives the same logits, and a prompt read whole those it gives a token at a time.

torch's int4 layout depends on the CPU's vector width (int4_layout: 64-row blocks for AVX-512,
32 for AVX2); pack_int4 and the tiles read it off torch's own converter once per process.

Every other type (F16, BF16) is kept as bf16 (from DENSE_TILES_FROM_M rows, in float32 tiles
where bf16 GEMMs are not native). Activations are rounded to bf16 for the int4 op and so is its
output (relative 2^-9); accumulation is float32. The exact float32 path is `weights.EXACT`
(`qvl.load(..., dtype=torch.float32)`).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ4_NL, dequantize

from .cpu_gemm import bf16_gemms, gemm_dtype
from .iq_grids import GRID_TYPES, SCALE_GROUP, grid_fields
from .iq_grids import f16_field as _f16

GROUP = 32  # weights per (scale, zero) pair of the int4 op
ROWS_PER_STEP = 2048  # rows decoded per step while packing (a multiple of 64): bounded temporaries
LEVEL_TYPES = (T.IQ4_NL, T.IQ4_XS, *GRID_TYPES)  # w = v * scale, integer levels v (|v| <= 127)
LEVEL_OFFSET = 136  # u = v + LEVEL_OFFSET = lo + 16 hi; with zero 0, (lo - 8) + 16 (hi - 8) = v
UNIFORM_LEVELS = (T.IQ3_S, T.IQ1_S)  # levels that are one 4-bit code: no halves
FIFTH_BIT_TYPES = (T.Q5_K, T.Q5_0, T.Q5_1)  # a 4-bit type's codes and scales with a fifth bit on top
INT4_TYPES = (T.Q4_K, T.Q4_0, T.Q4_1, T.Q6_K, *FIFTH_BIT_TYPES, T.Q8_0, T.Q3_K, T.Q2_K, *LEVEL_TYPES)
# sub-blocks of this many weights take two 4-bit halves, and what the second half multiplies: c * x
DOUBLED = {T.Q6_K: 16, T.Q5_K: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q8_0: 32, T.Q3_K: 16, T.Q2_K: 16,
           T.IQ4_NL: 32, T.IQ4_XS: 32, **{qt: n for qt, n in SCALE_GROUP.items() if qt not in UNIFORM_LEVELS}}
SECOND_HALF_X = {T.Q6_K: 8, T.Q5_K: 8, T.Q5_0: 8, T.Q5_1: 8, T.Q8_0: 16, T.Q3_K: 0, T.Q2_K: 0,
                 **{qt: 16 for qt in LEVEL_TYPES}}
# Rows of x from which tiles of bf16 weights beat the int4 op (scripts/bench_packed.py, 3B shapes,
# 2 threads: tiled / int4 ~1.0 at 160-192 rows for Q4, 0.6-0.95 at 96 for Q6_K's doubled op,
# which Q3_K / Q2_K take too).
DENSE_FROM_M = {T.Q4_K: 192, T.Q4_0: 192, T.Q4_1: 192, T.Q6_K: 96, T.Q3_K: 96, T.Q2_K: 96, T.Q8_0: 96,
                **{qt: 96 for qt in FIFTH_BIT_TYPES},
                **{qt: 192 if qt in UNIFORM_LEVELS else 96 for qt in LEVEL_TYPES}}
# The same where GEMMs run in float32 (cpu_gemm.py: no native bf16; 2-core AVX2 EPYC, 3B shapes,
# 2026-12-04): float32 tiles / int4 0.86-0.96 at 128 rows for one code a weight, 0.70-0.78 at 64
# (1.13-1.29 at 32) for the doubled ones. And from how many rows bf16 weights (F16, BF16) go
# through float32 tiles rather than a bf16 GEMM: 0.53-0.69 at 4 rows, 2.8-4.3 at one.
DENSE_FROM_M_F32 = {qt: 128 if m == 192 else 48 for qt, m in DENSE_FROM_M.items()}
DENSE_TILES_FROM_M = 3
IQ4_LEVELS = torch.tensor(IQ4_NL.kvalues, dtype=torch.int16)  # ggml's kvalues_iq4nl
TILE_ROWS = 256  # weight rows decoded to bf16 per GEMM (a multiple of 64): 1 MB for a 2048-wide weight


def q4_k_fields(raw: torch.Tensor, size: int = 144) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows (R, nb*144) uint8 -> q (R, K) in 0..15, scale and min (R, K/32): w = q*scale - min.
    With size 176, Q5_K rows: the same scales and nibbles (qs after qh[32]), q's fifth bit not
    included (`q5_k_high_bits`)."""
    b = raw.reshape(raw.shape[0], -1, size)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    s = b[..., 4:16].to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    m = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    qs = b[..., size - 128:size].reshape(*b.shape[:2], 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(raw.shape[0], -1)  # 64-chunks: low then high nibbles
    scale = (d[..., None] * sc).reshape(raw.shape[0], -1)
    mins = (dmin[..., None] * m).reshape(raw.shape[0], -1)
    return q, scale, mins


def q5_k_high_bits(raw: torch.Tensor) -> torch.Tensor:
    """Q5_K rows (R, nb*176) -> the fifth bit of every code (R, K) 0..1: element 32j + l's is bit
    j of qh[l]."""
    qh = raw.reshape(raw.shape[0], -1, 1, 176)[..., 16:48]  # (R, nb, 1, 32)
    return torch.cat([(qh >> j) & 1 for j in range(8)], dim=2).reshape(raw.shape[0], -1)


def q6_k_fields(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q6_K rows (R, nb*210) -> lo (R, K) 0..15, hi (R, K) 0..3, scale (R, K/16): w = (lo + 16*hi - 32)*scale."""
    R = raw.shape[0]
    b = raw.reshape(R, -1, 210)
    ql = b[..., 0:128].reshape(R, -1, 2, 1, 2, 32)  # half, (nibble), quarter-pair, l
    qh = b[..., 128:192].reshape(R, -1, 2, 1, 32)
    lo = torch.cat([ql & 15, ql >> 4], dim=3).reshape(R, -1)  # per half: ql[0:32]&15, ql[32:64]&15, ql>>4...
    hi = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=3).reshape(R, -1)
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    scale = (_f16(b[..., 208:210])[..., None] * sc).reshape(R, -1)
    return lo, hi, scale


def q4_0_fields(raw: torch.Tensor, with_min: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 rows -> q (R, K) 0..15, scale (R, K/32), offset (R, K/32): w = q*scale + offset."""
    R = raw.shape[0]
    size = 20 if with_min else 18
    b = raw.reshape(R, -1, size)
    d = _f16(b[..., 0:2])
    offset = _f16(b[..., 2:4]) if with_min else -8 * d
    return _block_nibbles(b[..., size - 16:size]), d, offset


def q5_0_fields(raw: torch.Tensor, with_min: bool) -> tuple[torch.Tensor, ...]:
    """Q5_0 (22-byte) / Q5_1 (24-byte) rows -> q (R, K) 0..15 and the fifth bit hb (R, K) 0..1,
    scale and offset (R, K/32): w = (q + 16*hb)*scale + offset. Bit j of a block's
    little-endian qh is element j's."""
    R = raw.shape[0]
    size = 24 if with_min else 22
    b = raw.reshape(R, -1, size)
    d = _f16(b[..., 0:2])
    offset = _f16(b[..., 2:4]) if with_min else -16 * d
    qh = b[..., size - 20:size - 16].reshape(R, -1, 4, 1)
    hb = ((qh >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(R, -1)
    return _block_nibbles(b[..., size - 16:size]), hb, d, offset


def q8_0_fields(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows (R, nb*34) -> v (R, K) int8, scale (R, K/32): w = v*scale."""
    b = raw.reshape(raw.shape[0], -1, 34)
    return b[..., 2:34].contiguous().view(torch.int8).reshape(raw.shape[0], -1), _f16(b[..., 0:2])


def _block_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(R, ..., 16 * n) uint8, the 16 bytes of each 32-weight block of a row in order -> codes
    (R, 32 * n) 0..15: Q4_0's order, a block's low nibbles then its high ones."""
    qs = qs.reshape(qs.shape[0], -1, 1, 16)
    return torch.cat([qs & 15, qs >> 4], dim=2).reshape(qs.shape[0], -1)


def iq4_fields(raw: torch.Tensor, qtype: T) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_NL (18-byte) or IQ4_XS (136-byte) rows -> v (R, K) int16 levels (-127..113), scale (R,
    K/32): w = v*scale. A 32-weight block's codes are Q4_0's nibbles of its 16 bytes."""
    R = raw.shape[0]
    if qtype == T.IQ4_NL:
        code, scale, _ = q4_0_fields(raw, with_min=False)
    else:
        b = raw.reshape(R, -1, 136)
        code = _block_nibbles(b[..., 8:136])
        high = b[..., 2:4].contiguous().view(torch.int16).to(torch.int32)  # (R, nb, 1) little-endian u16
        low = b[..., 4:8].to(torch.int32)
        ls = torch.stack([low & 15, low >> 4], -1).reshape(R, -1, 8) | (((high >> (2 * torch.arange(8))) & 3) << 4)
        scale = (_f16(b[..., 0:2])[..., None] * (ls - 32)).reshape(R, -1)
    return IQ4_LEVELS[code.int()], scale  # int32 indices: a 4-byte temporary a weight, not int64's 8


def q2_q3_k_fields(raw: torch.Tensor, qtype: T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q2_K (84-byte) or Q3_K (110-byte) rows -> q (R, K) 0..3 / 0..7, scale and offset (R, K/16):
    w = q*scale + offset. Element 128h + 32j + l: bits 2j of qs[32h + l] (Q3_K: bit 4h + j of
    hmask[l] above them)."""
    R = raw.shape[0]
    q3 = qtype == T.Q3_K
    b = raw.reshape(R, -1, 110 if q3 else 84)
    qs = b[..., 32:96] if q3 else b[..., 16:80]
    qs = qs.reshape(R, -1, 2, 1, 32)
    q = torch.cat([(qs >> (2 * j)) & 3 for j in range(4)], dim=3).reshape(R, -1)
    if not q3:
        d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
        sc = b[..., 0:16].to(torch.int32)
        scale = d[..., None] * (sc & 15)
        return q, scale.reshape(R, -1), (-dmin[..., None] * (sc >> 4)).reshape(R, -1)
    hmask = b[..., 0:32].reshape(R, -1, 1, 32)
    q |= torch.cat([((hmask >> bit) & 1) << 2 for bit in range(8)], dim=2).reshape(R, -1)
    s = b[..., 96:108].to(torch.int32)
    low = torch.cat([s[..., 0:8] & 15, s[..., 0:8] >> 4], -1)
    high = torch.cat([(s[..., 8:12] >> (2 * t)) & 3 for t in range(4)], -1)
    scale = (_f16(b[..., 108:110])[..., None] * ((low | high << 4) - 32)).reshape(R, -1)
    return q, scale, -4 * scale


def uniform_codes(v: torch.Tensor, s: torch.Tensor, qtype: T) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IQ3_S's or IQ1_S's grid_fields (v (R, K), s (R, K/32)) -> int4 codes q (R, K) with the
    int4 op's scale and zero (R, K/32): (q - 8)*scale + zero = v*s."""
    rows = v.shape[0]
    if qtype == T.IQ3_S:  # v odd, -15..15
        return (v + 15) >> 1, 2 * s, s
    g = (v + 4) >> 3  # IQ1_S: v = 8g + o, o = +-1 the same for a block's 32 weights
    return g + 8, 8 * s, (v - 8 * g).reshape(rows, -1, 32)[..., 0] * s


def as_torch(raw: np.ndarray, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Bytes of the read-only mapping as a tensor of `dtype`, without a copy; never written through."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(raw)).view(dtype)


def pack_halves(lo: torch.Tensor, c: torch.Tensor, half: int) -> torch.Tensor:
    """Codes (R, K) of a doubled type's two halves -> pack_int4 of [lo (half), c (half)] per
    `half` weights (DOUBLED's sub-block)."""
    rows = lo.shape[0]
    return pack_int4(torch.stack([lo.reshape(rows, -1, half), c.reshape(rows, -1, half)], dim=2).reshape(rows, -1))


@functools.cache
def int4_layout() -> tuple[int, torch.Tensor | None] | None:
    """torch's CPU int4 layout on this machine, which depends on the kernel's vector width: per
    block of B rows, for each k, B/2 bytes whose low nibbles hold rows order[:B/2] and high
    nibbles rows order[B/2:]. AVX-512: B = 64, order = 0..63 (rows j and j + 32 share a byte);
    AVX2: B = 32, order = 0..31; without vectors: B = 32, rows 2p and 2p + 1. Read off torch's own
    converter on a probe whose columns 0 and 1 spell each row's number -> (B, order, or None where
    it is 0..B-1); None for a layout none of these (the weights then stay bf16)."""
    row = torch.arange(64, dtype=torch.int32)
    probe = torch.zeros(64, 32, dtype=torch.int32)
    probe[:, 0], probe[:, 1] = row & 15, row >> 4
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 2).flatten()
    for block in (64, 32, 16):
        k0, k1 = packed[:block // 2], packed[block // 2:block]
        order = (torch.cat([k0 & 15, k0 >> 4]) | (torch.cat([k1 & 15, k1 >> 4]) << 4)).long()
        if torch.equal(order.sort().values, torch.arange(block)):
            return block, None if torch.equal(order, torch.arange(block)) else order
    return None


@functools.cache
def _slot_of_row() -> torch.Tensor:
    """For a layout with a row order: the nibble slot of each row (the inverse of the order)."""
    return int4_layout()[1].argsort()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(R, K) 4-bit values -> the layout of `torch._convert_weight_to_int4pack_for_cpu` on this
    CPU (int4_layout), built with byte operations (no int32 copy). Rows are padded to a multiple
    of 64 (of every layout's block) with zeros."""
    block, order = int4_layout()
    q = q.to(torch.uint8)
    q = F.pad(q, (0, 0, 0, -q.shape[0] % 64)) if q.shape[0] % 64 else q
    blocks = q.reshape(-1, block, q.shape[1]).transpose(1, 2)  # (R/B, K, B)
    if order is not None:
        blocks = blocks[..., order]
    return (blocks[..., :block // 2] | (blocks[..., block // 2:] << 4)).reshape(q.shape[0], -1)


def _first_half_zero(zero: torch.Tensor) -> torch.Tensor:
    """Zero points (R, n) of n 32-weight sub-blocks -> (R, 2n): each on its sub-block's first
    half, 0 on the second (the half whose codes multiply a multiple of x)."""
    return torch.stack([zero, torch.zeros_like(zero)], dim=2).reshape(zero.shape[0], -1)


class _TileWork:
    """Buffers for decoding tiles of up to `rows` weight rows (a multiple of 64) of width `cols`,
    in blocks of int4_layout's B rows, to `dtype` (gemm_dtype)."""

    def __init__(self, rows: int, cols: int, doubled: int, dtype: torch.dtype):
        """doubled: DOUBLED's sub-block size for the types whose codes come in halves, else 0."""
        block = int4_layout()[0]
        blocks = rows // block
        self.codes = torch.empty(blocks, 2 * cols if doubled else cols, 2, block // 2, dtype=torch.uint8)
        per = doubled or GROUP  # weights a scale
        self.combined = torch.empty(blocks, cols // per, per, block, dtype=torch.uint8) if doubled else None
        self.f32 = torch.empty(blocks, cols // per, per, block)
        # bf16 tiles are rounded before the transpose (half its bytes); float32 ones transpose f32
        self.packed_order = torch.empty(blocks, cols, block, dtype=dtype) if dtype != torch.float32 else None
        self.out = torch.empty(rows, cols, dtype=dtype)


class PackedMatrix:
    """`x @ W.T` for one GGUF weight `(rows, cols)`, repacked once; float32 in and out."""

    def __init__(self, qtype: T, raw: np.ndarray, rows: int, cols: int):
        self.qtype, self.rows, self.cols = qtype, rows, cols
        # widths of 64s (the tiles' squares): Qwen2.5-0.5B's 896 too (Q5_0 / Q8_0 rows, a draft model's)
        self.int4 = qtype in INT4_TYPES and cols % 64 == 0 and int4_layout() is not None
        packs, scales, zeros, dense = [], [], [], []
        for start in range(0, rows, ROWS_PER_STEP):
            part = raw[start:start + ROWS_PER_STEP]
            if not self.int4:
                if qtype in (T.F16, T.BF16):
                    half = as_torch(part).view(torch.float16 if qtype == T.F16 else torch.bfloat16)
                    dense.append(half.to(torch.bfloat16, copy=True))
                else:
                    rows_f32 = dequantize(np.ascontiguousarray(part), qtype).reshape(len(part), cols)
                    dense.append(torch.from_numpy(rows_f32).to(torch.bfloat16))
                continue
            t = as_torch(part)
            if qtype in FIFTH_BIT_TYPES:  # [q, 2*hb + 8] per 32 weights, one scale, zero on q's half
                if qtype == T.Q5_K:
                    q, s, mins = q4_k_fields(t, 176)
                    hb, offset = q5_k_high_bits(t), -mins
                else:
                    q, hb, s, offset = q5_0_fields(t, with_min=qtype == T.Q5_1)
                packs.append(pack_halves(q, 2 * hb + 8, 32))
                scales.append(s.repeat_interleave(2, dim=1))
                zeros.append(_first_half_zero(8 * s + offset))  # (q - 8)*s + zero + 16*hb*s
            elif qtype == T.Q8_0:  # [lo, hi] of v + 128 per 32 weights, zero 8*s on lo's half, against [x, 16x]
                v, s = q8_0_fields(t)
                u = (v.to(torch.int16) + 128).to(torch.uint8)
                packs.append(pack_halves(u & 15, u >> 4, 32))
                scales.append(s.repeat_interleave(2, dim=1))
                zeros.append(_first_half_zero(8 * s))  # (lo - 8)*s + 8*s + 16*(hi - 8)*s = (u - 128)*s
            elif qtype in UNIFORM_LEVELS:
                q, s, zero = uniform_codes(*grid_fields(t, qtype), qtype)
                packs.append(pack_int4(q))
                scales.append(s)
                zeros.append(zero)
            elif qtype in LEVEL_TYPES:  # [lo, hi] of v + 136 per scale's weights, zero 0, against [x, 16x]
                v, s = iq4_fields(t, qtype) if qtype in (T.IQ4_NL, T.IQ4_XS) else grid_fields(t, qtype)
                u = (v + LEVEL_OFFSET).to(torch.uint8)
                packs.append(pack_halves(u & 15, u >> 4, DOUBLED[qtype]))
                scales.append(s.repeat_interleave(2 * DOUBLED[qtype] // GROUP, dim=1))
                zeros.append(torch.zeros_like(scales[-1]))
            elif qtype in (T.Q3_K, T.Q2_K):  # [q + 8, 8] per 16-weight sub-block, against [x, 0]
                q, s, offset = q2_q3_k_fields(t, qtype)
                packs.append(pack_halves(q + 8, torch.full_like(q, 8), 16))
                scales.append(s)
                zeros.append(offset)  # (q + 8 - 8)*s + offset: a zero no larger than the weights
            elif qtype == T.Q6_K:
                lo, hi, s = q6_k_fields(t)
                packs.append(pack_halves(lo, 2 * hi + 5, 16))
                scales.append(s)
                zeros.append(torch.zeros_like(s))
            else:
                if qtype == T.Q4_K:
                    q, s, mins = q4_k_fields(t)
                    offset = -mins
                else:
                    q, s, offset = q4_0_fields(t, with_min=qtype == T.Q4_1)
                packs.append(pack_int4(q))
                scales.append(s)
                zeros.append(8 * s + offset)  # (q - 8)*s + zero = q*s + offset
        if not self.int4:
            self.dense = torch.cat(dense)
            return
        self.packed = torch.cat(packs)
        pad = (0, self.packed.shape[0] - rows)  # zero scale and zero for the padding rows
        scale, zero = F.pad(torch.cat(scales).T, pad), F.pad(torch.cat(zeros).T, pad)
        self.scale_zero = torch.stack([scale, zero], dim=-1).to(torch.bfloat16).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., cols) float32 -> (..., rows) float32."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.cols)
        if flat.shape[0] >= self.tiles_from_m():
            y = self.tiled_product(flat)
        elif self.int4:
            y = self.int4_product(flat.to(torch.bfloat16))
        else:
            y = flat.to(torch.bfloat16) @ self.dense.T
        return y[:, :self.rows].float().reshape(*lead, self.rows)

    @property
    def padded_rows(self) -> int:
        """Rows of the products and tiles: a multiple of 64 for the int4 layout, else `rows`."""
        return self.packed.shape[0] if self.int4 else self.rows

    def tiles_from_m(self) -> int | float:
        """Rows of x from which tiles of weights decoded for GEMMs beat the int4 op (or, for
        bf16 weights where GEMMs run in float32, a bf16 GEMM)."""
        if bf16_gemms():
            return DENSE_FROM_M[self.qtype] if self.int4 else float("inf")
        return DENSE_FROM_M_F32[self.qtype] if self.int4 else DENSE_TILES_FROM_M

    def int4_product(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (M, cols) bf16 -> (M, padded rows) bf16 through torch's int4 op (which takes a
        contiguous x only: a tiled product's output, the layer after's input, is transposed)."""
        flat = flat.contiguous()
        if self.qtype in DOUBLED:
            sub = flat.reshape(flat.shape[0], -1, DOUBLED[self.qtype])
            flat = torch.cat([sub, sub * SECOND_HALF_X[self.qtype]], dim=-1).reshape(flat.shape[0], -1)
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scale_zero)

    def tiled_product(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (M, cols) -> (M, padded rows) through GEMMs in gemm_dtype on TILE_ROWS-row tiles.
        Where they run in float32, x, the decoded tiles and the products are rounded to bf16's
        values, as a bf16 GEMM's are: the numbers of a CPU with bf16 GEMMs, and of the int4 op and
        the bf16 GEMM of fewer rows (a prompt read whole or a token at a time, cached or not, gives
        the same logits up to the order of the sums), whatever the CPU."""
        dtype = gemm_dtype()
        as_bf16 = dtype == torch.float32
        total = self.padded_rows
        out = torch.empty(total, flat.shape[0], dtype=dtype)
        # int4 tiles decoded to bf16 (a bf16 weight's rows are), widened for float32 GEMMs
        work = _TileWork(min(TILE_ROWS, total), self.cols, DOUBLED.get(self.qtype, 0),
                         torch.bfloat16) if self.int4 else None
        xt = (flat.to(torch.bfloat16) if as_bf16 else flat).to(dtype).T
        for start in range(0, total, TILE_ROWS):
            stop = min(start + TILE_ROWS, total)
            torch.mm(self.tile(start, stop, work).to(dtype), xt, out=out[start:stop])
        return out.T.to(torch.bfloat16) if as_bf16 else out.T

    def tile(self, start: int, stop: int, work: _TileWork | None = None) -> torch.Tensor:
        """Weight rows [start, stop) of the padded matrix (multiples of 64) in gemm_dtype (stop -
        start, cols): the int4 op's weights, (q - 8) * scale + zero computed in float32 (for bf16,
        rounded once; q * scale is exact in float32: 4 bits times bf16's 8). Decoded in the packed order (per
        block of B rows, for each k the B rows' codes), where a group's scale varies along the inner
        dimension, then transposed; every pass writes into `work`'s buffers, as fresh ones would
        cost a page fault per 4 KiB (half the time of a tile)."""
        if not self.int4:
            return self.dense[start:stop].to(gemm_dtype())
        block, order = int4_layout()
        n, blocks = stop - start, (stop - start) // block
        work = work or _TileWork(n, self.cols, DOUBLED.get(self.qtype, 0), gemm_dtype())
        p = self.packed[start:stop].view(torch.int32).view(blocks, -1, 1, block // 8)  # (blocks, k, 1, B/2 bytes)
        codes = work.codes[:blocks]  # (blocks, k, 2, B/2): low then high nibbles, 4 bytes at a time
        torch.bitwise_and(p, 0x0F0F0F0F, out=codes.view(torch.int32)[:, :, :1])
        torch.bitwise_right_shift(p, 4, out=codes.view(torch.int32)[:, :, 1:]).bitwise_and_(0x0F0F0F0F)
        if order is not None:  # rows in their natural order within the block
            codes = codes.view(blocks, -1, block)[..., _slot_of_row()]
        codes = codes.view(blocks, -1, GROUP, block)  # (blocks, groups, 32, rows)
        sz = self.scale_zero[:, start:stop].float().view(-1, blocks, block, 2).permute(3, 1, 0, 2)
        w = work.f32[:blocks]
        if self.qtype in DOUBLED:  # halves [lo, c] of one scale, zero z on lo's only (0 on c's where
            # c multiplies a*x), against x and a*x (a = SECOND_HALF_X: 8 or 16, or 0 where z is not 0):
            # w = (lo - 8)*scale + z + a*(c - 8)*scale = (lo + a*c - 8 - 8a)*scale + z,
            # lo + a*c <= 249 (a byte)
            half, a = DOUBLED[self.qtype], SECOND_HALF_X[self.qtype]
            pairs = codes.view(blocks, -1, 2, half, block)  # (blocks, sub-blocks, lo | c, half, rows)
            torch.add(pairs[:, :, 0], pairs[:, :, 1], alpha=a, out=work.combined[:blocks])
            w.copy_(work.combined[:blocks])
            pair_sz = sz.view(2, blocks, -1, 2 * half // GROUP, 1, block)[:, :, :, 0]  # lo's group of each pair
            pair_scale = pair_sz[0].contiguous()
            w.mul_(pair_scale).add_(pair_sz[1] - (8 + 8 * a) * pair_scale)
        else:
            scale = sz[0].unsqueeze(2).contiguous()  # (blocks, groups, 1, rows)
            w.copy_(codes)
            w.mul_(scale).add_((sz[1] - 8 * sz[0]).unsqueeze(2))
        packed_order = w.view(blocks, self.cols, block)
        if work.packed_order is not None:
            packed_order = work.packed_order[:blocks].copy_(packed_order)
        tile = work.out[:n]  # [b, j, k] <- [b, k, j], copied by B x B squares
        tile.view(blocks, block, -1, block).copy_(packed_order.view(blocks, -1, block, block).permute(0, 3, 1, 2))
        return tile

    def nbytes(self) -> int:
        if not self.int4:
            return self.dense.numel() * 2
        return self.packed.numel() + self.scale_zero.numel() * 2
