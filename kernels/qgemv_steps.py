"""One 256-element K step of the decode GEMV (qgemv.py) for each GGUF type: the bytes of a
step's BLOCK_N weight rows to `acc`, with scales applied once per sub-block.

Batch-1 decode streams every weight byte once per token, so the GEMV is bound by memory
bandwidth: it should read each byte of a block once, in contiguous runs, and do as little
arithmetic per weight as it can. So, unlike the tiled GEMM (qmatmul.py, which decodes a
(BLOCK_N, 256) float tile in element order for the tensor cores), a step never forms the
weights:

- the quant bytes of one step are loaded as (BLOCK_N, A, B) tiles with B the contiguous run of
  a sub-block (Q4_K / Q5_K: the 4 x 32 bytes of qs once, low and high nibbles split after the
  load, Q5_K's qh[32] again for each of the four groups, in the codes' layout; Q6_K: ql and qh
  once, the four 2+4-bit quarters split after; Q2_K / Q3_K: qs (and hmask) once, the four
  2-bit fields split after; Q8_0 / Q5_0 / Q4_0 / Q5_1 / Q4_1: the 8 blocks of 32);
- x is loaded in the matching element order, and a sub-block contributes
  `scale * sum(q * x)` (K-quants: minus `min * sum(x)`), so the scales are applied once per 16
  or 32 weights instead of once per weight (M > 1; batch 1 in _rows);
- at batch 1 on an NVIDIA GPU, codes become floats through inline PTX, never an int-to-float
  conversion (16 a clock per SM: it bounded Q8_0's loop): four bytes a register, their
  nibbles or 2-bit fields (Q6_K, Q5_0, Q5_K, Q3_K: and the high bits) masked at once, each
  byte moved by one `prmt` into the float 2^23 + 65536 q (bits 0x4B0q0000), so that
  w = f * (scale / 65536) - (128 scale + min) (Q6_K: - 160 scale, Q5_0: - 144 d, Q4_0: - 136 d,
  Q4_1 / Q5_1: - (128 d - m), Q3_K: - 132 scale) is one FMA; Q8_0's signed bytes (sign bit
  flipped) go to the low byte, 2^23 + 128 + q, and one exact add gives q (IQ4's levels too,
  looked up by byte permutations in a table held in registers). In Triton's interpreter and on
  ROCm (no inline PTX: Target.ptx) the same floats come from plain integer ops (`_magic`).

Element layouts (qblocks.py's, regrouped):
  Q8_0: block a (34 bytes: f16 d, 32 int8)                    e = 32a + b,            w = d*q
  Q4_K / Q5_K: group g, byte l of qs: low nibble e = 64g + l (sub-block 2g), high nibble
        e = 64g + 32 + l (sub-block 2g + 1); Q5_K: bits 2g, 2g + 1 of qh[l] on top
                                                              w = d*sc*q - dmin*m
  Q6_K: a = 2h + (l // 16), b = l % 16 for half h, lane l: quarter t takes the low (t < 2) or
        high nibble of ql[64h + 32(t % 2) + l] and bits 2t of qh[32h + l];
        e = 128h + 32t + l, scale index 8h + 2t + (l // 16);  w = d*scale*(q - 32)
  Q5_0 / Q4_0: block a (f16 d, Q5_0: u32 qh, 16 qs): byte b, low nibble e = 32a + b (Q5_0:
        with bit b of qh), high nibble e = 32a + 16 + b (bit 16 + b); w = d*(q - 16) / d*(q - 8)
  Q5_1 / Q4_1: the same after f16 d, f16 m                    w = d*q + m
  Q2_K / Q3_K: Q6_K's (a, b); field j (bits 2j) of qs[32h + l] (Q3_K: bit 4h + j of hmask[l]
        above it): e = 128h + 32j + l, sub-block 8h + 2j + (l // 16)
                                                  w = d*sc*q - dmin*m / d*(sc - 32)*(q - 4)
  IQ4_NL / IQ4_XS: Q4_0's (a, b) (IQ4_XS: sub-block a's 16 bytes at 8 + 16a)
                                                  w = d*KVALUES[q] / d*(ls - 32)*KVALUES[q]

`step` dispatches on QTYPE (qblocks.QTYPE_IDS); `lane_sums` / `row_sums` are the batch-1
accumulator a type's steps add to and its reduction after the K loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .qblocks import KVALUE_WORDS, f16_at, iq4_byte, q4_k_scale_pairs
from .qgrids import decode_grid

RUN = tl.constexpr(4)  # batch 1, Q8_0 / IQ4: consecutive products a thread sums before scaling (_rows)


@triton.jit
def _rows(acc, x_step, stride_xm, M, rows, offs, q, scale, mins, OFFSET: tl.constexpr, HAS_MIN: tl.constexpr,
          BLOCK_M: tl.constexpr):
    """For weights w[n, a, b] = (q[n, a, b] - OFFSET) * scale[n, a] (- mins[n, a] with HAS_MIN),
    q integer codes (or floats): acc[i, n] += sum_ab w[n, a, b] * x[i, offs[a, b]] for each row
    i < M of x, with the scales applied once per sub-block (sum of q * x, then times scale).
    With one row of x (BLOCK_M = 1: batch-1 decode) no thread reduces across threads in the
    loop (shuffles, shared memory, barriers); acc is per lane, summed once after the K loop:
    - HAS_MIN (Q4_K, and the magic floats of Q6_K and Q5_0, whose offset is a min): acc
      (BLOCK_N, A, B), acc[n, a, b] += (q * scale - min) * x, two FMAs a weight;
    - otherwise (Q8_0): acc (BLOCK_N, A, B // V, 1) with V = B // acc.shape[2]: each thread
      sums its run of V consecutive products (V = RUN = 4, the run one thread holds in these
      layouts) and scales the sum once.
    On sm_90 the Q4_K loop is 172-178 SASS instructions a step with no barrier; 296 with 12
    barriers and 20 shuffles when each step reduced (docs/benchmarks.md)."""
    if OFFSET == 0:
        qf = q.to(tl.float32)
    else:
        qf = (q - OFFSET).to(tl.float32)
    if BLOCK_M == 1:  # x loaded straight into the weights' layout (no exchange through shared memory)
        x = tl.load(x_step + tl.broadcast_to(offs[None, :, :], q.shape)).to(tl.float32)
        if HAS_MIN:
            w = qf * scale[:, :, None]
            w -= mins[:, :, None]
            acc += w * x
        else:
            BN: tl.constexpr = q.shape[0]
            A: tl.constexpr = q.shape[1]
            B: tl.constexpr = q.shape[2]
            V: tl.constexpr = B // acc.shape[2]
            dot = tl.sum(tl.reshape(qf * x, (BN, A, B // V, V)), axis=3)
            acc += tl.reshape(dot * scale[:, :, None], (BN, A, B // V, 1))
    else:
        for i in tl.static_range(BLOCK_M):
            x = tl.load(x_step + i * stride_xm + offs, mask=offs < tl.where(M > i, 256, 0), other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(qf * x[None, :, :], axis=2) * scale, axis=1)
            if HAS_MIN:
                part -= tl.sum(mins * tl.sum(x, axis=1)[None, :], axis=1)
            acc = tl.where(rows[:, None] == i, acc + part[None, :], acc)
    return acc


@triton.jit
def _step_q8_0(acc, x_step, stride_xm, M, rows, row, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
    b = tl.arange(0, 32)
    for h in tl.static_range(2):
        a = 4 * h + tl.arange(0, 4)
        blk = row[:, None] + a[None, :] * 34  # (BLOCK_N, 4)
        byte = tl.load(blk[:, :, None] + 2 + b[None, None, :])
        d = f16_at(blk)
        if BLOCK_M == 1:
            # q = f - (2^23 + 128), exactly, f = 2^23 + (q + 128): a permutation and an add a
            # weight where an int-to-float conversion (a quarter of the FMA rate or less) was
            if ASM:
                f = tl.inline_asm_elementwise(Q8_0_MAGIC_ASM, "=r,=r,=r,=r,r", [byte], dtype=tl.float32, is_pure=True,
                                              pack=4)
            else:
                f = ((byte ^ 0x80).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
            q = f - 8388736.0
        else:
            q = byte.to(tl.int8, bitcast=True)
        acc = _rows(acc, x_step, stride_xm, M, rows, a[:, None] * 32 + b[None, :], q, d, d, 0, False, BLOCK_M)
    return acc


def _magic_prmt(src: str, first: int, low: bool = False) -> str:
    """PTX: the four bytes of register `src` as magic floats into operands $first .. $first + 3
    (byte j: element j of the pack), one byte permutation each: 2^23 + 65536 * byte (bits
    0x4B0q0000, bytes 0..127), or with `low` 2^23 + byte (bits 0x4B0000qq, any byte)."""
    select = "0x754{}" if low else "0x7{}54"
    return " ".join(f"prmt.b32 ${first + j}, {src}, 0x4B000000, {select.format(j)};" for j in range(4))


# Four int8 codes in a 32-bit register ($4) -> 2^23 + 128 + q each: the sign bits flipped
# (q + 128 as an unsigned byte) and each byte moved under the exponent.
Q8_0_MAGIC_ASM = tl.constexpr("{.reg .b32 t; xor.b32 t, $4, 0x80808080; " + _magic_prmt("t", 0, low=True) + "}")


# Four bytes of qs in a 32-bit register ($8) -> the magic floats of their low nibbles ($0..$3)
# and high nibbles ($4..$7): a mask (and a shift) per 4 bytes and one byte permutation per
# weight, where compiled Triton took a byte extract, a shift and a mask (or an int-to-float
# conversion) per weight.
Q4_K_MAGIC_ASM = tl.constexpr("{.reg .b32 t; and.b32 t, $8, 0x0F0F0F0F; " + _magic_prmt("t", 0)
                              + " shr.b32 t, $8, 4; and.b32 t, t, 0x0F0F0F0F; " + _magic_prmt("t", 4) + "}")


@triton.jit
def _magic_nibbles(byte):
    """Bytes of codes (low and high nibbles) -> their magic floats (low, high), Q4_K_MAGIC_ASM."""
    return tl.inline_asm_elementwise(Q4_K_MAGIC_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _magic(nib):
    """2^23 + 65536 * nib as a float32, nib in 0..15: the bits 0x4B0n0000."""
    return ((nib.to(tl.int32) << 16) | 0x4B000000).to(tl.float32, bitcast=True)


def _q5_k_asm() -> str:
    """4 bytes of qs ($8), the 4 bytes of qh of the same lanes ($9) and 2g ($10; $11-$13 the
    other elements' copies, unused: a pack is 4 lanes of one group g) -> the magic floats of
    the low nibbles with qh's bit 2g above ($0..$3) and of the high nibbles with bit 2g + 1
    ($4..$7): one shift of qh for all, then a mask and an OR per 4 codes."""
    return ("{.reg .b32 n, h, t; shr.b32 h, $9, $10; "
            "shl.b32 t, h, 4; and.b32 t, t, 0x10101010; and.b32 n, $8, 0x0F0F0F0F; or.b32 n, n, t; "
            + _magic_prmt("n", 0) + " shl.b32 t, h, 3; and.b32 t, t, 0x10101010; shr.b32 n, $8, 4; "
            "and.b32 n, n, 0x0F0F0F0F; or.b32 n, n, t; " + _magic_prmt("n", 4) + "}")


Q5_K_MAGIC_ASM = tl.constexpr(_q5_k_asm())


@triton.jit
def _step_k_quant_4_5(acc, x_step, stride_xm, M, rows, row, HIGH_BIT: tl.constexpr, BLOCK_M: tl.constexpr,
                      ASM: tl.constexpr):
    """A Q4_K step, or with HIGH_BIT a Q5_K step (qh[32] before qs: bits 2g, 2g + 1 of qh[l]
    above group g's low and high nibbles)."""
    g = tl.arange(0, 4)
    l = tl.arange(0, 32)
    byte = tl.load(row[:, None, None] + (48 if HIGH_BIT else 16) + 32 * g[None, :, None] + l[None, None, :])
    if HIGH_BIT:
        # qh[l] loaded again for each group (L1 serves the repeats) in byte's layout: loaded
        # once and broadcast, the copy to byte's layout went through shared memory (3 barriers)
        qh = tl.load(row[:, None, None] + 16 + 0 * g[None, :, None] + l[None, None, :])
        shift = tl.broadcast_to((2 * g)[None, :, None], byte.shape)
    d = f16_at(row)[:, None]
    dmin = f16_at(row + 2)[:, None]
    offs = 64 * g[:, None] + l[None, :]
    sc_lo, m_lo, sc_hi, m_hi = q4_k_scale_pairs(row, g)
    if BLOCK_M == 1 and ASM:
        if HIGH_BIT:
            f_lo, f_hi = tl.inline_asm_elementwise(Q5_K_MAGIC_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r",
                                                   [byte, qh, shift], dtype=(tl.float32, tl.float32),
                                                   is_pure=True, pack=4)
        else:
            f_lo, f_hi = _magic_nibbles(byte)
    else:
        q = byte.to(tl.int32)
        q_lo = q & 15
        q_hi = q >> 4
        if HIGH_BIT:
            h = qh.to(tl.int32) >> shift
            q_lo |= (h & 1) << 4
            q_hi |= (h & 2) << 3
        if BLOCK_M == 1:
            f_lo = _magic(q_lo)
            f_hi = _magic(q_hi)
    if BLOCK_M == 1:
        # w = q * d*sc - dmin*m = f * (d*sc / 65536) - (128 * d*sc + dmin*m)
        d_f = d * (1.0 / 65536)  # exact
        scale = d_f * sc_lo
        acc = _rows(acc, x_step, stride_xm, M, rows, offs, f_lo, scale, scale * (128.0 * 65536) + dmin * m_lo, 0,
                    True, BLOCK_M)
        scale = d_f * sc_hi
        acc = _rows(acc, x_step, stride_xm, M, rows, offs + 32, f_hi, scale, scale * (128.0 * 65536) + dmin * m_hi,
                    0, True, BLOCK_M)
    else:
        acc = _rows(acc, x_step, stride_xm, M, rows, offs, q_lo, d * sc_lo, dmin * m_lo, 0, True, BLOCK_M)
        acc = _rows(acc, x_step, stride_xm, M, rows, offs + 32, q_hi, d * sc_hi, dmin * m_hi, 0, True, BLOCK_M)
    return acc


def _q6_k_asm(t: int) -> str:
    """Quarter t of a Q6_K half: 4 bytes of ql ($4) and of qh ($5) -> the magic floats
    2^23 + 65536 * q of their 6-bit values q (the nibble of ql, qh's bits 2t, 2t + 1 above it)."""
    nib = "and.b32 n, $4, 0x0F0F0F0F;" if t < 2 else "shr.b32 n, $4, 4; and.b32 n, n, 0x0F0F0F0F;"
    high = {0: "shl.b32 h, $5, 4;", 1: "shl.b32 h, $5, 2;", 2: "mov.b32 h, $5;", 3: "shr.b32 h, $5, 2;"}[t]
    return "{.reg .b32 n, h; " + nib + " " + high + " and.b32 h, h, 0x30303030; or.b32 n, n, h; " + \
        _magic_prmt("n", 0) + "}"


Q6_K_ASM_0 = tl.constexpr(_q6_k_asm(0))
Q6_K_ASM_1 = tl.constexpr(_q6_k_asm(1))
Q6_K_ASM_2 = tl.constexpr(_q6_k_asm(2))
Q6_K_ASM_3 = tl.constexpr(_q6_k_asm(3))


@triton.jit
def _q6_k_quarter(acc, x_step, stride_xm, M, rows, row, d, a, b, ql, qh, t: tl.constexpr, BLOCK_M: tl.constexpr,
                  ASM: tl.constexpr):
    """Quarter t (0..3) of the step's two halves: ql holds its nibbles (low for t < 2), qh its
    2 high bits (bits 2t, 2t + 1)."""
    scale = tl.load(row[:, None] + 192 + 8 * (a // 2) + 2 * t + a % 2).to(tl.int8, bitcast=True).to(tl.float32)
    offs = (128 * (a // 2) + 32 * t + 16 * (a % 2))[:, None] + b[None, :]
    if BLOCK_M == 1:
        # w = d*scale*(q - 32) = f * (d*scale / 65536) - 160 * d*scale, f = 2^23 + 65536 q
        if ASM:
            if t == 0:
                code: tl.constexpr = Q6_K_ASM_0
            elif t == 1:
                code: tl.constexpr = Q6_K_ASM_1
            elif t == 2:
                code: tl.constexpr = Q6_K_ASM_2
            else:
                code: tl.constexpr = Q6_K_ASM_3
            f = tl.inline_asm_elementwise(code, "=r,=r,=r,=r,r,r", [ql, qh], dtype=tl.float32, is_pure=True, pack=4)
        else:
            f = _magic(_q6_k_value(ql.to(tl.int32), qh.to(tl.int32), t))
        scale = d * scale  # d / 65536 (exact) by the caller
        acc = _rows(acc, x_step, stride_xm, M, rows, offs, f, scale, scale * (160.0 * 65536), 0, True, BLOCK_M)
    else:
        acc = _rows(acc, x_step, stride_xm, M, rows, offs, _q6_k_value(ql.to(tl.int32), qh.to(tl.int32), t),
                    d * scale, d, 32, False, BLOCK_M)
    return acc


@triton.jit
def _q6_k_value(ql, qh, t: tl.constexpr):
    if t < 2:
        nib = ql & 15
    else:
        nib = ql >> 4
    return nib | (((qh >> (2 * t)) & 3) << 4)


@triton.jit
def _step_q6_k(acc, x_step, stride_xm, M, rows, row, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
    a = tl.arange(0, 4)
    b = tl.arange(0, 16)
    lane = (64 * (a // 2) + 16 * (a % 2))[None, :, None] + b[None, None, :]  # ql byte of quarters 0 and 2
    r = row[:, None, None]
    ql0 = tl.load(r + lane)
    ql1 = tl.load(r + lane + 32)
    qh = tl.load(r + 128 + (32 * (a // 2) + 16 * (a % 2))[None, :, None] + b[None, None, :])
    d = f16_at(row + 208)[:, None]
    if BLOCK_M == 1:
        d *= 1.0 / 65536  # _q6_k_quarter's scale of the magic floats
    acc = _q6_k_quarter(acc, x_step, stride_xm, M, rows, row, d, a, b, ql0, qh, 0, BLOCK_M, ASM)
    acc = _q6_k_quarter(acc, x_step, stride_xm, M, rows, row, d, a, b, ql1, qh, 1, BLOCK_M, ASM)
    acc = _q6_k_quarter(acc, x_step, stride_xm, M, rows, row, d, a, b, ql0, qh, 2, BLOCK_M, ASM)
    return _q6_k_quarter(acc, x_step, stride_xm, M, rows, row, d, a, b, ql1, qh, 3, BLOCK_M, ASM)


def _q5_0_asm() -> str:
    """4 bytes of qs ($8: the low nibbles are elements j0..j0+3 of the block, the high nibbles
    j0+16..j0+19), the block's qh halves ($9: bits of elements 0..15, $13: 16..31) and j0 ($17)
    -> the magic floats 2^23 + 65536 q of the 5-bit codes (qh's bit above the nibble): qh's 4 bits
    of the run are spread to bit 4 of each byte by one multiply (shifted copies at bits 4, 12,
    20, 28 that do not overlap, then a mask). The other elements' copies of the run's qh and j0
    ($10-$12, $14-$16, $18-$20) are unused: the 4 elements of a pack are a run j0..j0+3 in the
    GEMV's layout (checked from the compiled layout by tests/kernels/test_cross_compile.py)."""
    def half(qh: str, nib: str) -> str:
        return (f"shr.b32 h, {qh}, $17; and.b32 h, h, 15; mul.lo.u32 h, h, 0x02040810; and.b32 h, h, 0x10101010; "
                + nib + " and.b32 n, n, 0x0F0F0F0F; or.b32 n, n, h;")
    return ("{.reg .b32 n, h; " + half("$9", "mov.b32 n, $8;") + " " + _magic_prmt("n", 0) + " "
            + half("$13", "shr.b32 n, $8, 4;") + " " + _magic_prmt("n", 4) + "}")


Q5_0_MAGIC_ASM = tl.constexpr(_q5_0_asm())


@triton.jit
def _step_32(acc, x_step, stride_xm, M, rows, row, HIGH_BIT: tl.constexpr, MIN: tl.constexpr, BLOCK_M: tl.constexpr,
             ASM: tl.constexpr):
    """A step of eight 32-element blocks: Q4_0 (18 bytes: d, qs[16]), with HIGH_BIT Q5_0 (22
    bytes: d, u32 qh, qs[16]); with MIN Q4_1 / Q5_1 (f16 m after d: 20 / 24 bytes, w = d*q + m)."""
    BYTES: tl.constexpr = (24 if HIGH_BIT else 20) if MIN else (22 if HIGH_BIT else 18)
    QH: tl.constexpr = 4 if MIN else 2
    QS: tl.constexpr = QH + 4 if HIGH_BIT else QH
    OFFSET: tl.constexpr = 0 if MIN else (16 if HIGH_BIT else 8)  # w = d * (q - OFFSET) (+ m)
    b = tl.arange(0, 16)
    for h in tl.static_range(2):
        a = 4 * h + tl.arange(0, 4)
        blk = row[:, None] + a[None, :] * BYTES  # (BLOCK_N, 4)
        d = f16_at(blk)
        if MIN:
            mn = f16_at(blk + 2)
        p = blk[:, :, None]
        byte = tl.load(p + QS + b[None, None, :])
        if HIGH_BIT:
            qh_lo = tl.load((p + QH).to(tl.pointer_type(tl.uint16))).to(tl.int32)  # bits of elements 0..15
            qh_hi = tl.load((p + QH + 2).to(tl.pointer_type(tl.uint16))).to(tl.int32)  # 16..31
        shift = b[None, None, :]
        offs = 32 * a[:, None] + b[None, :]
        if BLOCK_M == 1 and ASM:
            if HIGH_BIT:
                run = tl.broadcast_to(shift & 12, byte.shape)
                f_lo, f_hi = tl.inline_asm_elementwise(
                    Q5_0_MAGIC_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                    [byte, tl.broadcast_to(qh_lo, byte.shape), tl.broadcast_to(qh_hi, byte.shape), run],
                    dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
            else:
                f_lo, f_hi = _magic_nibbles(byte)
        else:
            q = byte.to(tl.int32)
            code_lo = q & 15
            code_hi = q >> 4
            if HIGH_BIT:
                code_lo |= ((qh_lo >> shift) << 4) & 16
                code_hi |= ((qh_hi >> shift) << 4) & 16
            if BLOCK_M == 1:
                f_lo = _magic(code_lo)
                f_hi = _magic(code_hi)
        if BLOCK_M == 1:
            # w = (q - OFFSET) * d (+ m) = f * (d / 65536) - ((128 + OFFSET) d (- m)), f = 2^23 + 65536 q
            scale = d * (1.0 / 65536)  # exact
            mins = d * (128.0 + OFFSET)
            if MIN:
                mins -= mn
            acc = _rows(acc, x_step, stride_xm, M, rows, offs, f_lo, scale, mins, 0, True, BLOCK_M)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs + 16, f_hi, scale, mins, 0, True, BLOCK_M)
        elif MIN:
            acc = _rows(acc, x_step, stride_xm, M, rows, offs, code_lo, d, -mn, 0, True, BLOCK_M)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs + 16, code_hi, d, -mn, 0, True, BLOCK_M)
        else:
            acc = _rows(acc, x_step, stride_xm, M, rows, offs, code_lo, d, d, OFFSET, False, BLOCK_M)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs + 16, code_hi, d, d, OFFSET, False, BLOCK_M)
    return acc


# Q2_K's 2-bit codes at bit $5 of four bytes of qs ($4; $6-$8 the other elements' copies of the
# shift, unused: a pack is a run of 4 bytes of one field) -> their magic floats ($0..$3); Q3_K's
# with bit $10 of four bytes of hmask ($5) above them (the shifts $6 and $10: Q3_K's operands
# are qs, hmask, then the two shifts).
Q2_K_MAGIC_ASM = tl.constexpr("{.reg .b32 n; shr.b32 n, $4, $5; and.b32 n, n, 0x03030303; "
                              + _magic_prmt("n", 0) + "}")
Q3_K_MAGIC_ASM = tl.constexpr("{.reg .b32 n, h; shr.b32 n, $4, $6; and.b32 n, n, 0x03030303; shr.b32 h, $5, $10; "
                              "and.b32 h, h, 0x01010101; shl.b32 h, h, 2; or.b32 n, n, h; " + _magic_prmt("n", 0) + "}")


@triton.jit
def _step_q2_q3_k(acc, x_step, stride_xm, M, rows, row, Q3: tl.constexpr, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
    """A Q2_K step, or with Q3 a Q3_K step (qblocks.py's layouts), in Q6_K's tile: a = 2h +
    (l // 16), b = l % 16 for half h and byte l of its 32 bytes of qs; the four 2-bit fields
    of a byte (shift 2j) are elements 128h + 32j + l, in 16-element sub-blocks
    8h + 2j + (l // 16), each with its own scale (Q2_K: and min); Q3_K's bit 4h + j of hmask[l]
    is the code's third. At batch 1 on an NVIDIA GPU the codes of four bytes become magic floats
    at once (Q2_K_MAGIC_ASM, Q3_K_MAGIC_ASM)."""
    a = tl.arange(0, 4)
    b = tl.arange(0, 16)
    lane = (16 * (a % 2))[None, :, None] + b[None, None, :]  # l
    byte = tl.load(row[:, None, None] + (32 if Q3 else 16) + (32 * (a // 2))[None, :, None] + lane)
    if Q3:
        hmask = tl.load(row[:, None, None] + lane)
        d = f16_at(row + 108)[:, None]
        # the scales of sub-blocks 8h + 2j + (a % 2): low nibbles in bytes 2j + (a % 2) (nibble h),
        # high bits in bytes 8 + 2 (j % 2) + (a % 2) (bits 4h + 2 (j // 2)); read as 16-bit pairs
        words = row[:, None] + 96
        pick = (8 * (a % 2) + 4 * (a // 2))[None, :]
    else:
        d = f16_at(row + 80)[:, None]
        dmin = f16_at(row + 82)[:, None]
    for j in tl.static_range(4):
        offs = (128 * (a // 2) + 32 * j + 16 * (a % 2))[:, None] + b[None, :]
        high = (4 * (a // 2) + j)[None, :, None]  # Q3_K: the bit of hmask
        if BLOCK_M == 1 and ASM:
            shift = tl.full(byte.shape, 2 * j, tl.int32)
            if Q3:
                f = tl.inline_asm_elementwise(Q3_K_MAGIC_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                              [byte, hmask, shift, tl.broadcast_to(high, byte.shape)],
                                              dtype=tl.float32, is_pure=True, pack=4)
            else:
                f = tl.inline_asm_elementwise(Q2_K_MAGIC_ASM, "=r,=r,=r,=r,r,r,r,r,r", [byte, shift],
                                              dtype=tl.float32, is_pure=True, pack=4)
        else:
            code = (byte.to(tl.int32) >> (2 * j)) & 3
            if Q3:
                code |= ((hmask.to(tl.int32) >> high) & 1) << 2
            f = _magic(code)
        if Q3:
            low = tl.load((words + 2 * j).to(tl.pointer_type(tl.uint16))).to(tl.int32)
            top = tl.load((words + 8 + 2 * (j % 2)).to(tl.pointer_type(tl.uint16))).to(tl.int32)
            sc = ((low >> pick) & 15) | (((top >> (pick + 2 * (j // 2))) & 3) << 4)
            scale = d * (sc - 32).to(tl.float32)
            if BLOCK_M == 1:  # w = scale * (q - 4) = f * (scale / 65536) - 132 scale, f = 2^23 + 65536 q
                acc = _rows(acc, x_step, stride_xm, M, rows, offs, f, scale * (1.0 / 65536), scale * 132.0, 0, True,
                            BLOCK_M)
            else:
                acc = _rows(acc, x_step, stride_xm, M, rows, offs, code, scale, scale, 4, False, BLOCK_M)
        else:
            sub = 8 * (a // 2) + 2 * j + a % 2  # (4,) sub-block of each a
            packed = tl.load(row[:, None] + sub[None, :]).to(tl.int32)
            scale = d * (packed & 15).to(tl.float32)
            mins = dmin * (packed >> 4).to(tl.float32)
            if BLOCK_M == 1:  # w = scale * q - min = f * (scale / 65536) - (128 scale + min)
                acc = _rows(acc, x_step, stride_xm, M, rows, offs, f, scale * (1.0 / 65536), scale * 128.0 + mins, 0,
                            True, BLOCK_M)
            else:
                acc = _rows(acc, x_step, stride_xm, M, rows, offs, code, scale, mins, 0, True, BLOCK_M)
    return acc


def _iq4_asm() -> str:
    """Four bytes of qs ($8: codes of elements j0..j0+3 in the low nibbles, j0+16.. in the high)
    -> the floats 2^23 + 128 + KVALUES[code] of the low nibbles ($0..$3) and of the high ones
    ($4..$7): byte permutations look the codes up in the table (KVALUE_WORDS, in registers),
    eight entries at a time by a code's low 3 bits (a selector's top bit would replicate a
    sign), then pick the half its bit 3 names; one more permutation a code moves the byte under
    the exponent (low mode: any byte value, like Q8_0)."""
    table = " ".join(f"mov.b32 t{i}, {w & 0xFFFFFFFF:#010x};" for i, w in enumerate(KVALUE_WORDS))
    look = "prmt.b32 lo, t0, t1, s; prmt.b32 hi, t2, t3, s; prmt.b32 v, lo, hi, p;"

    def spread(first: int) -> str:  # v = [lo_j, hi_j, lo_j+1, hi_j+1] -> $first, $first + 4, $first + 1, $first + 5
        return " ".join(f"prmt.b32 ${out}, v, 0x4B000000, 0x754{byte};"
                        for byte, out in enumerate((first, first + 4, first + 1, first + 5)))
    return ("{.reg .b32 s, p, t0, t1, t2, t3, lo, hi, v; " + table + " and.b32 s, $8, 0x77777777; "
            "and.b32 p, $8, 0x88888888; shr.b32 p, p, 1; or.b32 p, p, 0x32103210; " + look + " " + spread(0)
            + " shr.b32 s, s, 16; shr.b32 p, p, 16; " + look + " " + spread(2) + "}")


IQ4_MAGIC_ASM = tl.constexpr(_iq4_asm())


@triton.jit
def _step_iq4(acc, x_step, stride_xm, M, rows, row, XS: tl.constexpr, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
    """A step of IQ4_NL (eight 18-byte blocks: Q4_0's layout) or with XS of IQ4_XS (one 136-byte
    block: eight 32-weight sub-blocks of 16 bytes from byte 8, 6-bit scales less 32): codes
    looked up in KVALUES, then Q8_0's batch-1 sum (runs of products scaled once: the levels are
    integers up to 127, exact in the float 2^23 + 128 + level less 2^23 + 128)."""
    b = tl.arange(0, 16)
    if XS:
        d = f16_at(row)[:, None]
        high = tl.load((row + 2).to(tl.pointer_type(tl.uint16))).to(tl.int32)[:, None]
    for h in tl.static_range(2):
        a = 4 * h + tl.arange(0, 4)
        if XS:
            low = tl.load(row[:, None] + 4 + (a // 2)[None, :]).to(tl.int32)
            ls = ((low >> (4 * (a % 2))[None, :]) & 15) | (((high >> (2 * a)[None, :]) & 3) << 4)
            scale = d * (ls - 32).to(tl.float32)
            qs = row[:, None] + 8 + 16 * a[None, :]  # (BLOCK_N, 4)
        else:
            blk = row[:, None] + a[None, :] * 18
            scale = f16_at(blk)
            qs = blk + 2
        byte = tl.load(qs[:, :, None] + b[None, None, :])
        offs = 32 * a[:, None] + b[None, :]
        if BLOCK_M == 1 and ASM:
            f_lo, f_hi = tl.inline_asm_elementwise(IQ4_MAGIC_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte],
                                                   dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            q = byte.to(tl.int32)
            u_lo = iq4_byte(q & 15)
            u_hi = iq4_byte(q >> 4)
            f_lo = (u_lo | 0x4B000000).to(tl.float32, bitcast=True)
            f_hi = (u_hi | 0x4B000000).to(tl.float32, bitcast=True)
        if BLOCK_M == 1:
            acc = _rows(acc, x_step, stride_xm, M, rows, offs, f_lo - 8388736.0, scale, scale, 0, False, BLOCK_M)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs + 16, f_hi - 8388736.0, scale, scale, 0, False, BLOCK_M)
        else:
            acc = _rows(acc, x_step, stride_xm, M, rows, offs, u_lo, scale, scale, 128, False, BLOCK_M)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs + 16, u_hi, scale, scale, 128, False, BLOCK_M)
    return acc


@triton.jit
def _step_grid(acc, x_step, stride_xm, M, rows, row, g_ptr, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr):
    """A step (one 256-weight block) of a grid type (qgrids.py): the weights decoded element by
    element as a (BLOCK_N, 32, 8) tile of 8-weight chunks, multiplied by x, each chunk summed
    (batch 1: per lane, acc (BLOCK_N, 32))."""
    e = tl.arange(0, 32)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    w = decode_grid(row[:, None, None], g_ptr, e // 8, e % 8, QTYPE)
    if BLOCK_M == 1:
        x = tl.load(x_step + tl.broadcast_to(e, w.shape)).to(tl.float32)  # in w's layout (as _rows)
        acc += tl.sum(w * x, axis=2)
    else:
        for i in tl.static_range(BLOCK_M):
            x = tl.load(x_step + i * stride_xm + e, mask=e < tl.where(M > i, 256, 0), other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(w * x, axis=2), axis=1)
            acc = tl.where(rows[:, None] == i, acc + part[None, :], acc)
    return acc


@triton.jit
def lane_sums(QTYPE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Batch 1's zeroed per-lane accumulator for a type's steps (_rows): the (A, B) tile of a
    step's sub-blocks for each of BLOCK_N rows (Q8_0, IQ4: runs of RUN products summed)."""
    if QTYPE == 1 or QTYPE == 5:
        acc = tl.zeros((BLOCK_N, 4, 32), dtype=tl.float32)
    elif QTYPE == 0:
        acc = tl.zeros((BLOCK_N, 4, 32 // RUN, 1), dtype=tl.float32)
    elif QTYPE == 10 or QTYPE == 11:
        acc = tl.zeros((BLOCK_N, 4, 16 // RUN, 1), dtype=tl.float32)
    elif QTYPE >= 12:
        acc = tl.zeros((BLOCK_N, 32), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, 4, 16), dtype=tl.float32)
    return acc


@triton.jit
def row_sums(acc, QTYPE: tl.constexpr):
    """lane_sums' accumulator after the K loop -> (1, BLOCK_N) sums a row."""
    if QTYPE >= 12:
        sums = tl.sum(acc, axis=1)
    elif (QTYPE == 0 or QTYPE == 10) or QTYPE == 11:  # parenthesized: Triton 3.3 and before refuse A or B or C
        sums = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    else:
        sums = tl.sum(tl.sum(acc, axis=2), axis=1)
    return sums[None, :]


@triton.jit
def step(acc, x_step, stride_xm, M, rows, row, g_ptr, QTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
         ASM: tl.constexpr):
    """acc plus the products of the K step whose weight bytes start at `row` (BLOCK_N pointers)
    with x's step at x_step: (BLOCK_M, BLOCK_N) sums, or lane_sums' tile at batch 1. g_ptr: the
    grid types' table (qgrids.type_grid)."""
    if QTYPE >= 12:
        acc = _step_grid(acc, x_step, stride_xm, M, rows, row, g_ptr, QTYPE, BLOCK_M)
    elif QTYPE == 1:
        acc = _step_k_quant_4_5(acc, x_step, stride_xm, M, rows, row, False, BLOCK_M, ASM)
    elif QTYPE == 2:
        acc = _step_q6_k(acc, x_step, stride_xm, M, rows, row, BLOCK_M, ASM)
    elif QTYPE == 3:
        acc = _step_32(acc, x_step, stride_xm, M, rows, row, True, False, BLOCK_M, ASM)
    elif QTYPE == 4:
        acc = _step_32(acc, x_step, stride_xm, M, rows, row, False, False, BLOCK_M, ASM)
    elif QTYPE == 5:
        acc = _step_k_quant_4_5(acc, x_step, stride_xm, M, rows, row, True, BLOCK_M, ASM)
    elif QTYPE == 6:
        acc = _step_32(acc, x_step, stride_xm, M, rows, row, False, True, BLOCK_M, ASM)
    elif QTYPE == 7:
        acc = _step_32(acc, x_step, stride_xm, M, rows, row, True, True, BLOCK_M, ASM)
    elif QTYPE == 8:
        acc = _step_q2_q3_k(acc, x_step, stride_xm, M, rows, row, False, BLOCK_M, ASM)
    elif QTYPE == 9:
        acc = _step_q2_q3_k(acc, x_step, stride_xm, M, rows, row, True, BLOCK_M, ASM)
    elif QTYPE == 10:
        acc = _step_iq4(acc, x_step, stride_xm, M, rows, row, False, BLOCK_M, ASM)
    elif QTYPE == 11:
        acc = _step_iq4(acc, x_step, stride_xm, M, rows, row, True, BLOCK_M, ASM)
    else:
        acc = _step_q8_0(acc, x_step, stride_xm, M, rows, row, BLOCK_M, ASM)
    return acc
