"""GGUF quant blocks read in Triton: the types the kernels take, and each one's decoder.

The kernels walk K in steps of STEP = 256 elements (a K-quant super-block, or eight 32-element
blocks). Layouts (byte offsets within a block; convert/quant/ writes all but Q2_K, Q3_K and IQ4):
  Q8_0 (34 B / 32):  f16 d | int8 q[32]                                   w = d * q
  Q4_0 (18 B / 32):  f16 d | qs[16]: element j < 16 the low nibble of qs[j], j >= 16 the high
                     nibble of qs[j - 16]                                 w = d * (q - 8)
  Q5_0 (22 B / 32):  f16 d | u32 qh | qs[16]: Q4_0's nibble, bit j of qh on top
                                                                          w = d * (q - 16)
  Q4_1 (20 B / 32), Q5_1 (24 B / 32): f16 d | f16 m | then Q4_0's qs (Q5_0's qh, qs)
                                                                          w = d * q + m
  Q2_K (84 B / 256): scales[16] | qs[64] | f16 d | f16 dmin: with h = e // 128, j = (e % 128)
                     // 32, l = e % 32: bits 2j of qs[32h + l]; scales[e // 16] holds sc (low
                     nibble) and m (high)                                  w = d*sc*q - dmin*m
  Q3_K (110 B / 256): hmask[32] | qs[64] | scales[12] | f16 d: Q2_K's 2 bits, bit 4h + j of
                     hmask[l] above them; 6-bit scale s = e // 16: the nibble s // 8 of
                     scales[s % 8], bits 2 (s // 4) of scales[8 + s % 4] above
                                                                          w = d*(sc - 32)*(q - 4)
  IQ4_NL (18 B / 32): Q4_0's layout                                       w = d * KVALUES[q]
  IQ4_XS (136 B / 256): f16 d | u16 scales_h | scales_l[4] | qs[128]: sub-block ib = e // 32
                     takes Q4_0's nibbles of the 16 bytes at 8 + 16 ib, 6-bit scale ls from
                     nibble ib % 2 of scales_l[ib // 2], bits 2 ib of scales_h above
                                                                          w = d*(ls - 32)*KVALUES[q]
  Q4_K (144 B / 256): f16 d | f16 dmin | scales[12] | qs[128]: with g = e // 64, l = e % 32,
                     hi = (e % 64) >= 32: the low (hi: high) nibble of qs[32g + l], and the
                     6-bit (sc, m) of sub-block j = 2g + hi                w = d*sc*q - dmin*m
  Q5_K (176 B / 256): f16 d | f16 dmin | scales[12] | qh[32] | qs[128]: Q4_K's nibble and
                     scales, bit 2g + hi of qh[l] on top                   w = d*sc*q - dmin*m
  Q6_K (210 B / 256): ql[128] | qh[64] | int8 scales[16] | f16 d: h = e // 128, r = e % 128,
                     quarter = r // 32, l = r % 32: the nibble of ql[64h + l + 32*(quarter % 2)]
                     (low for quarter < 2), bits 2*quarter of qh[32h + l] on top
                                                                          w = d*scale[e//16]*(q-32)

  IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: grid types, qgrids.py (layouts in
                     runtime/iq_grids.py)

`decode_tile` decodes any elements of a step in element order (the tiled GEMM in qmatmul.py,
dequant.py); the decode GEMV (qgemv_steps.py) regroups the same bytes by sub-block instead.
Torch reference for all of them: gguf-py's `dequantize`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from .qgrids import GRID_IDS, decode_grid

STEP = 256  # elements of K per loop iteration
# The types the kernels read (the Q4_K_M / Q5_K_M / Q3_K / Q2_K / IQ4_XS mixes, their fallbacks
# (IQ4_NL: Q2_K's, Q3_K's and IQ4_XS's), and Q4_0 / Q4_1 files) and the id a kernel's QTYPE
# constexpr takes for each.
QTYPE_IDS = {T.Q8_0: 0, T.Q4_K: 1, T.Q6_K: 2, T.Q5_0: 3, T.Q4_0: 4, T.Q5_K: 5, T.Q4_1: 6, T.Q5_1: 7, T.Q2_K: 8,
             T.Q3_K: 9, T.IQ4_NL: 10, T.IQ4_XS: 11, **GRID_IDS}
SUPPORTED = tuple(QTYPE_IDS)
# IQ4_NL / IQ4_XS's 16 non-linear levels (ggml's kvalues_iq4nl), and the same plus 128 as bytes
# packed four to a 32-bit word (entry i in byte i % 4 of word i // 4) for lookups by shifts
# (`iq4_byte`) or byte permutations (qgemv_steps.py), as signed 32-bit values
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
KVALUE_WORDS = tuple(int.from_bytes(bytes(v + 128 for v in KVALUES[4 * i:4 * i + 4]), "little", signed=True)
                     for i in range(4))
_W0 = tl.constexpr(KVALUE_WORDS[0])
_W1 = tl.constexpr(KVALUE_WORDS[1])
_W2 = tl.constexpr(KVALUE_WORDS[2])
_W3 = tl.constexpr(KVALUE_WORDS[3])


@triton.jit
def f16_at(ptr):
    """The little-endian float16 at byte pointer(s) `ptr`, as float32: one 2-byte load (every
    float16 of these block types sits at an even offset of an even-length row)."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def q4_k_scale_min(s, j):
    """The 6-bit scale and min of Q4_K / Q5_K sub-block(s) j (0..7) from the 12 packed bytes at s."""
    low = j < 4
    s_j = tl.load(s + j).to(tl.int32)
    s_j4 = tl.load(s + j + 4).to(tl.int32)
    s_jm4 = tl.load(s + tl.where(low, j, j - 4)).to(tl.int32)
    sc = tl.where(low, s_j & 63, (s_j4 & 15) | ((s_jm4 >> 6) << 4))
    m = tl.where(low, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def q4_k_scale_pairs(row, g):
    """Scales and mins of sub-blocks 2g and 2g + 1 (g (G,) in 0..3) of the Q4_K / Q5_K blocks at
    byte pointers row (BN,): (sc_lo, m_lo, sc_hi, m_hi), each (BN, G) float32. The 12 packed
    bytes are read as three 32-bit words (a block and its scales are 4-byte aligned) and
    unpacked four sub-blocks a word at once: sc0..3 = s0 & 63 (per byte), m0..3 = s1 & 63,
    sc4..7 = s2's low nibbles with s0's top 2 bits above, m4..7 = s2's high nibbles with s1's; a
    sub-block's value is then one byte of a word (q4_k_scale_min reads byte by byte: 6 byte
    loads a pair)."""
    w = row.to(tl.pointer_type(tl.int32))
    s0 = tl.load(w + 1)[:, None]
    s1 = tl.load(w + 2)[:, None]
    s2 = tl.load(w + 3)[:, None]
    low = (g < 2)[None, :]
    sc = tl.where(low, s0 & 0x3F3F3F3F, (s2 & 0x0F0F0F0F) | ((s0 >> 2) & 0x30303030))
    m = tl.where(low, s1 & 0x3F3F3F3F, ((s2 >> 4) & 0x0F0F0F0F) | ((s1 >> 2) & 0x30303030))
    shift = (16 * (g % 2))[None, :]  # sub-block 2g's byte: 2g mod 4
    return (((sc >> shift) & 255).to(tl.float32), ((m >> shift) & 255).to(tl.float32),
            ((sc >> (shift + 8)) & 255).to(tl.float32), ((m >> (shift + 8)) & 255).to(tl.float32))


@triton.jit
def _decode_q8_0(row_ptr, e):
    """row_ptr: (BLOCK_N, 1) pointers to the step's first block; e: (1, len) element indices."""
    blk = row_ptr + (e // 32) * 34
    d = f16_at(blk)
    q = tl.load(blk + 2 + e % 32).to(tl.int8, bitcast=True).to(tl.float32)
    return d * q


@triton.jit
def _nibble_32(blk, j):
    """Code j (0..31) of the 32-element block whose qs[16] start at byte pointer blk."""
    byte = tl.load(blk + j % 16).to(tl.int32)
    return tl.where(j < 16, byte & 15, byte >> 4)


@triton.jit
def _decode_32(row_ptr, e, HIGH_BIT: tl.constexpr, MIN: tl.constexpr):
    """The 32-weight blocks with Q4_0's nibbles: Q4_0 (18 bytes: d, qs), with HIGH_BIT Q5_0 (22:
    d, qh, qs); with MIN Q4_1 / Q5_1 (20 / 24: m after d, w = d * q + m)."""
    BYTES: tl.constexpr = (24 if HIGH_BIT else 20) if MIN else (22 if HIGH_BIT else 18)
    QH: tl.constexpr = 4 if MIN else 2
    QS: tl.constexpr = QH + 4 if HIGH_BIT else QH
    blk = row_ptr + (e // 32) * BYTES
    j = e % 32
    q = _nibble_32(blk + QS, j)
    if HIGH_BIT:
        qh = tl.load(blk + QH + j // 8).to(tl.int32)  # little-endian u32: bit j is bit j % 8 of byte j // 8
        q |= ((qh >> (j % 8)) & 1) << 4
    if MIN:
        w = f16_at(blk) * q.to(tl.float32) + f16_at(blk + 2)
    else:
        w = f16_at(blk) * (q - (16 if HIGH_BIT else 8)).to(tl.float32)
    return w


@triton.jit
def _decode_q2_k(row_ptr, e):
    q = (tl.load(row_ptr + 16 + 32 * (e // 128) + e % 32).to(tl.int32) >> (2 * ((e % 128) // 32))) & 3
    s = tl.load(row_ptr + e // 16).to(tl.int32)
    return f16_at(row_ptr + 80 + 0 * e) * (s & 15).to(tl.float32) * q.to(tl.float32) - \
        f16_at(row_ptr + 82 + 0 * e) * (s >> 4).to(tl.float32)


@triton.jit
def _decode_q3_k(row_ptr, e):
    j = (e % 128) // 32
    l = e % 32
    q = (tl.load(row_ptr + 32 + 32 * (e // 128) + l).to(tl.int32) >> (2 * j)) & 3
    q |= ((tl.load(row_ptr + l).to(tl.int32) >> (4 * (e // 128) + j)) & 1) << 2
    s = e // 16
    sc = (tl.load(row_ptr + 96 + s % 8).to(tl.int32) >> (4 * (s // 8))) & 15
    sc |= ((tl.load(row_ptr + 104 + s % 4).to(tl.int32) >> (2 * (s // 4))) & 3) << 4
    return f16_at(row_ptr + 108 + 0 * e) * (sc - 32).to(tl.float32) * (q - 4).to(tl.float32)


@triton.jit
def iq4_byte(code):
    """KVALUES[code] + 128 (1..241) for int32 codes 0..15: three selects and a shift of the
    packed table."""
    word = tl.where(code < 8, tl.where(code < 4, _W0, _W1), tl.where(code < 12, _W2, _W3))
    return (word >> ((code & 3) * 8)) & 255


@triton.jit
def _decode_iq4_nl(row_ptr, e):
    blk = row_ptr + (e // 32) * 18
    return f16_at(blk) * (iq4_byte(_nibble_32(blk + 2, e % 32)) - 128).to(tl.float32)


@triton.jit
def _decode_iq4_xs(row_ptr, e):
    ib = e // 32
    high = (tl.load((row_ptr + 2 + 0 * e).to(tl.pointer_type(tl.uint16))).to(tl.int32) >> (2 * ib)) & 3
    ls = ((tl.load(row_ptr + 4 + ib // 2).to(tl.int32) >> (4 * (ib % 2))) & 15) | (high << 4)
    q = iq4_byte(_nibble_32(row_ptr + 8 + 16 * ib, e % 32)) - 128
    return f16_at(row_ptr + 0 * e) * (ls - 32).to(tl.float32) * q.to(tl.float32)


@triton.jit
def _decode_k_quant_4_5(row_ptr, e, HIGH_BIT: tl.constexpr):
    """Q4_K (HIGH_BIT False) or Q5_K: the same scales and nibbles, Q5_K's qh bit above."""
    d = f16_at(row_ptr + 0 * e)
    dmin = f16_at(row_ptr + 2 + 0 * e)
    g = e // 64
    hi = ((e % 64) >= 32).to(tl.int32)
    sc, m = q4_k_scale_min(row_ptr + 4, 2 * g + hi)
    l = e % 32
    if HIGH_BIT:
        byte = tl.load(row_ptr + 48 + 32 * g + l).to(tl.int32)
        qh = tl.load(row_ptr + 16 + l).to(tl.int32)
        q = tl.where(hi == 1, byte >> 4, byte & 15) | (((qh >> (2 * g + hi)) & 1) << 4)
    else:
        byte = tl.load(row_ptr + 16 + 32 * g + l).to(tl.int32)
        q = tl.where(hi == 1, byte >> 4, byte & 15)
    return d * sc * q.to(tl.float32) - dmin * m


@triton.jit
def _decode_q6_k(row_ptr, e):
    h = e // 128
    within = e % 128
    quarter = within // 32
    l = within % 32
    ql = tl.load(row_ptr + 64 * h + l + 32 * (quarter % 2)).to(tl.int32)
    nib = tl.where(quarter < 2, ql & 15, ql >> 4)
    qh = tl.load(row_ptr + 128 + 32 * h + l).to(tl.int32)
    q = nib | (((qh >> (2 * quarter)) & 3) << 4)
    sc = tl.load(row_ptr + 192 + e // 16).to(tl.int8, bitcast=True).to(tl.float32)
    d = f16_at(row_ptr + 208 + 0 * e)
    return d * sc * (q - 32).to(tl.float32)


@triton.jit
def decode_tile(w_ptr, g_ptr, rn_safe, e, kb, row_bytes, step_bytes, QTYPE: tl.constexpr):
    """Elements e (any of 0..255) of K-step kb of weight rows rn_safe, decoded: (len(rn_safe),
    len(e)) float32. QTYPE: QTYPE_IDS of the rows' type; g_ptr: its grid (qgrids.type_grid;
    any pointer for the other types)."""
    row_ptr = w_ptr + rn_safe[:, None].to(tl.int64) * row_bytes + kb * step_bytes
    if QTYPE >= 12:
        w = decode_grid(row_ptr, g_ptr, e[None, :] // 8, e[None, :] % 8, QTYPE)
    elif QTYPE == 1:
        w = _decode_k_quant_4_5(row_ptr, e[None, :], False)
    elif QTYPE == 2:
        w = _decode_q6_k(row_ptr, e[None, :])
    elif QTYPE == 3:
        w = _decode_32(row_ptr, e[None, :], True, False)
    elif QTYPE == 4:
        w = _decode_32(row_ptr, e[None, :], False, False)
    elif QTYPE == 5:
        w = _decode_k_quant_4_5(row_ptr, e[None, :], True)
    elif QTYPE == 6:
        w = _decode_32(row_ptr, e[None, :], False, True)
    elif QTYPE == 7:
        w = _decode_32(row_ptr, e[None, :], True, True)
    elif QTYPE == 8:
        w = _decode_q2_k(row_ptr, e[None, :])
    elif QTYPE == 9:
        w = _decode_q3_k(row_ptr, e[None, :])
    elif QTYPE == 10:
        w = _decode_iq4_nl(row_ptr, e[None, :])
    elif QTYPE == 11:
        w = _decode_iq4_xs(row_ptr, e[None, :])
    else:
        w = _decode_q8_0(row_ptr, e[None, :])
    return w
