"""Decode's dequantizing matrix-vector product (M <= 8 rows of x) straight from GGUF blocks.

Batch-1 decode streams every weight byte once per token, so this kernel is bound by memory
bandwidth: it should read each byte of a block once, in contiguous runs, and do as little
arithmetic per weight as it can. So, unlike the tiled GEMM in qmatmul.py (which decodes a
(BLOCK_N, 256) float tile in element order for the tensor cores), it never forms the weights:

- the quant bytes of one 256-element step are loaded as (BLOCK_N, A, B) tiles with B the
  contiguous run of a sub-block (Q4_K: the 4 x 32 bytes of qs once, low and high nibbles split
  after the load; Q6_K: ql and qh once, the four 2+4-bit quarters split after; Q8_0 / Q5_0: the
  8 blocks of 32);
- x is loaded in the matching element order, and a sub-block contributes
  `scale * sum(q * x)` (Q4_K: minus `min * sum(x)`), so the scales are applied once per 16 or
  32 weights instead of once per weight (M > 1; batch 1 in _rows);
- at batch 1 on an NVIDIA GPU, codes become floats through inline PTX, never an int-to-float
  conversion (16 a clock per SM: it bounded Q8_0's loop): four bytes a register, their
  nibbles (Q6_K, Q5_0: and qh's bits) masked at once, each byte moved by one `prmt` into the
  float 2^23 + 65536 q (bits 0x4B0q0000), so that w = f * (scale / 65536) - (128 scale + min)
  (Q6_K: - 160 scale, Q5_0: - 144 d) is one FMA; Q8_0's signed bytes (sign bit flipped) go to
  the low byte, 2^23 + 128 + q, and one exact add gives q. In Triton's interpreter and on ROCm
  (no inline PTX: Target.ptx) the same floats come from plain integer ops (`_magic`);
- on an NVIDIA GPU each program also asks L2 (`prefetch.global.L2`, one a thread, every 32-byte
  sector of its rows' step) for the step PREFETCH steps ahead, so that more than the one 16-byte
  load a thread has in flight per step keeps DRAM busy while it computes.

Element layouts (the same as qmatmul.py's decoders, regrouped):
  Q8_0: block a (34 bytes: f16 d, 32 int8)                    e = 32a + b,            w = d*q
  Q4_K: group g, byte l of qs[32g + l]: low nibble e = 64g + l (sub-block 2g), high nibble
        e = 64g + 32 + l (sub-block 2g + 1);                  w = d*sc*q - dmin*m
  Q6_K: a = 2h + (l // 16), b = l % 16 for half h, lane l: quarter t takes the low (t < 2) or
        high nibble of ql[64h + 32(t % 2) + l] and bits 2t of qh[32h + l];
        e = 128h + 32t + l, scale index 8h + 2t + (l // 16);  w = d*scale*(q - 32)
  Q5_0: block a (22 bytes: f16 d, u32 qh, 16 qs): byte b, low nibble e = 32a + b with bit b
        of qh, high nibble e = 32a + 16 + b with bit 16 + b;   w = d*(q - 16)

Split-K: program (row block, split) sums a range of the K steps. With one split it finishes
its rows itself; with more it writes its partial sums to a (splits, M, row blocks * BLOCK_N)
buffer and counts itself in on its row block's counter (arrival.py): the program that arrives
last adds the partials in split order (results do not depend on scheduling) and finishes the
rows. Finishing is the epilogue: bias and
residual, or SwiGLU's `silu(gate) * up` over stacked [gate; up] rows, for which a program takes
BLOCK_N / 2 gate rows and the up rows of the same outputs (interleaved: gate, up, gate, ...), so
no output needs rows of two programs. With NORM (a projection adding to the residual stream
whose result feeds an RMSNorm: the o projection before the MLP's norm, down before the next
layer's), each finishing program counts itself in again on a launch-wide counter, and the last
normalizes the finished rows (rmsnorm.norm_row), so the norm needs no launch of its own.
A decode layer's projections cost one launch each (a
separate combine launch per split GEMV before: 4-5 a layer of a 7B Q4_K_M step on sm_90,
scripts/count_launches.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .arrival import counters, last_to_arrive
from .rmsnorm import CHUNK as NORM_CHUNK
from .rmsnorm import norm_row
from .target import INTERPRETER, target

STEP = 256  # elements of K per loop iteration
QTYPE_IDS = {T.Q8_0: 0, T.Q4_K: 1, T.Q6_K: 2, T.Q5_0: 3}
BLOCK_N = 16  # weight rows per program on a GPU (not tuned on one yet)
NUM_WARPS = 4
# On a GPU, each program asks L2 for the weight bytes of the step this many steps ahead of the
# one it loads (0: no prefetch). A thread's loop loads one 16-byte run of weights a step, so
# without it a warp has 512 bytes in flight at a time; the prefetches keep later steps moving
# while it computes. Not timed on a GPU yet (bench_kernels.py --sweep tries 0, 1, 2, 4).
PREFETCH = 2
INTERPRETED_BLOCK_N = 128  # in Triton's interpreter, where each program costs milliseconds
# Default K splits aim for this many programs per SM: what fits resident at once (128 threads at
# 64-96 registers for batch 1: 5-8 programs of 65536 registers; docs/benchmarks.md), so
# that enough weight bytes are in flight to cover memory latency. With 4 (the first guess) the
# 7B's q/k/v, o and down projections got 2-3.4 programs per H100 SM. Partial sums cost
# splits * M * N * 8 bytes, ~1-2% of the weight bytes at these shapes. Not timed on a GPU yet.
PROGRAMS_PER_CORE = 8
INTERPRETED_PROGRAMS = 4  # in the interpreter (one "core"): a few splits, each costs milliseconds
RUN = tl.constexpr(4)  # batch 1, Q8_0: consecutive products a thread sums before scaling (_rows)


@triton.jit
def f16_at(ptr):
    """The little-endian float16 at byte pointer(s) `ptr`, as float32: one 2-byte load (every
    float16 of these block types sits at an even offset of an even-length row)."""
    return tl.load(ptr.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def q4_k_scale_min(s, j):
    """The 6-bit scale and min of Q4_K sub-block(s) j (0..7) from the 12 packed bytes at s."""
    low = j < 4
    s_j = tl.load(s + j).to(tl.int32)
    s_j4 = tl.load(s + j + 4).to(tl.int32)
    s_jm4 = tl.load(s + tl.where(low, j, j - 4)).to(tl.int32)
    sc = tl.where(low, s_j & 63, (s_j4 & 15) | ((s_jm4 >> 6) << 4))
    m = tl.where(low, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def q4_k_scale_pairs(row, g):
    """Scales and mins of sub-blocks 2g and 2g + 1 (g (G,) in 0..3) of the Q4_K blocks at byte
    pointers row (BN,): (sc_lo, m_lo, sc_hi, m_hi), each (BN, G) float32. The 12 packed bytes
    are read as three 32-bit words (a block and its scales are 4-byte aligned) and unpacked four
    sub-blocks a word at once: sc0..3 = s0 & 63 (per byte), m0..3 = s1 & 63, sc4..7 = s2's low
    nibbles with s0's top 2 bits above, m4..7 = s2's high nibbles with s1's; a sub-block's value
    is then one byte of a word (q4_k_scale_min reads byte by byte: 6 byte loads a pair)."""
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
def _magic(nib):
    """2^23 + 65536 * nib as a float32, nib in 0..15: the bits 0x4B0n0000."""
    return ((nib.to(tl.int32) << 16) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _step_q4_k(acc, x_step, stride_xm, M, rows, row, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
    g = tl.arange(0, 4)
    l = tl.arange(0, 32)
    byte = tl.load(row[:, None, None] + 16 + 32 * g[None, :, None] + l[None, None, :])
    d = f16_at(row)[:, None]
    dmin = f16_at(row + 2)[:, None]
    offs = 64 * g[:, None] + l[None, :]
    sc_lo, m_lo, sc_hi, m_hi = q4_k_scale_pairs(row, g)
    if BLOCK_M == 1:
        if ASM:
            f_lo, f_hi = tl.inline_asm_elementwise(Q4_K_MAGIC_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [byte],
                                                   dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            f_lo = _magic(byte & 15)
            f_hi = _magic(byte >> 4)
        # w = nib * d*sc - dmin*m = f * (d*sc / 65536) - (128 * d*sc + dmin*m)
        d_f = d * (1.0 / 65536)  # exact
        scale = d_f * sc_lo
        acc = _rows(acc, x_step, stride_xm, M, rows, offs, f_lo, scale, scale * (128.0 * 65536) + dmin * m_lo, 0,
                    True, BLOCK_M)
        scale = d_f * sc_hi
        acc = _rows(acc, x_step, stride_xm, M, rows, offs + 32, f_hi, scale, scale * (128.0 * 65536) + dmin * m_hi,
                    0, True, BLOCK_M)
    else:
        q = byte.to(tl.int32)
        acc = _rows(acc, x_step, stride_xm, M, rows, offs, q & 15, d * sc_lo, dmin * m_lo, 0, True, BLOCK_M)
        acc = _rows(acc, x_step, stride_xm, M, rows, offs + 32, q >> 4, d * sc_hi, dmin * m_hi, 0, True, BLOCK_M)
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
def _step_q5_0(acc, x_step, stride_xm, M, rows, row, BLOCK_M: tl.constexpr, ASM: tl.constexpr):
    b = tl.arange(0, 16)
    for h in tl.static_range(2):
        a = 4 * h + tl.arange(0, 4)
        blk = row[:, None] + a[None, :] * 22  # (BLOCK_N, 4)
        d = f16_at(blk)
        p = blk[:, :, None]
        byte = tl.load(p + 6 + b[None, None, :])
        qh_lo = tl.load((p + 2).to(tl.pointer_type(tl.uint16))).to(tl.int32)  # bits of elements 0..15
        qh_hi = tl.load((p + 4).to(tl.pointer_type(tl.uint16))).to(tl.int32)  # 16..31
        shift = b[None, None, :]
        offs = 32 * a[:, None] + b[None, :]
        if BLOCK_M == 1 and ASM:
            run = tl.broadcast_to(shift & 12, byte.shape)
            f_lo, f_hi = tl.inline_asm_elementwise(
                Q5_0_MAGIC_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                [byte, tl.broadcast_to(qh_lo, byte.shape), tl.broadcast_to(qh_hi, byte.shape), run],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            q = byte.to(tl.int32)
            code_lo = (q & 15) | (((qh_lo >> shift) << 4) & 16)
            code_hi = (q >> 4) | (((qh_hi >> shift) << 4) & 16)
            if BLOCK_M == 1:
                f_lo = _magic(code_lo)
                f_hi = _magic(code_hi)
        if BLOCK_M == 1:
            # w = (q - 16) * d = f * (d / 65536) - 144 d, f = 2^23 + 65536 q (both constants exact)
            scale = d * (1.0 / 65536)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs, f_lo, scale, d * 144.0, 0, True, BLOCK_M)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs + 16, f_hi, scale, d * 144.0, 0, True, BLOCK_M)
        else:
            acc = _rows(acc, x_step, stride_xm, M, rows, offs, code_lo, d, d, 16, False, BLOCK_M)
            acc = _rows(acc, x_step, stride_xm, M, rows, offs + 16, code_hi, d, d, 16, False, BLOCK_M)
    return acc


@triton.jit
def _weight_row(w_ptr, pid_n, j, N_OUT, row_bytes, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr):
    """(output column, first byte of its weight row) of a program's row slot(s) j (0 ..
    BLOCK_N - 1), rows `row_bytes` apart: with SWIGLU, output c's gate row c and up row
    N_OUT + c side by side."""
    if SWIGLU:
        out_col = pid_n * (BLOCK_N // 2) + j // 2
        rn = out_col + (j % 2) * N_OUT
    else:
        out_col = pid_n * BLOCK_N + j
        rn = out_col
    rn_safe = tl.where(out_col < N_OUT, rn, 0)  # rows past the end read row 0 and are never stored
    return out_col, w_ptr + rn_safe.to(tl.int64) * row_bytes


@triton.jit
def _prefetch_l2(row_start, kb, STEP_BYTES: tl.constexpr):
    """Ask L2 for step kb of the weight rows at `row_start` (pointers, one per thread): a
    `prefetch.global.L2`, which neither waits nor takes a register until the step's loads."""
    ptr = row_start + kb * STEP_BYTES
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptr], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _finish(acc, y_ptr, bias_ptr, res_ptr, M, N_OUT, pid_n, rows, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
            SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a program's sums acc (BLOCK_M, BLOCK_N) to y (M, N_OUT): plus bias and residual,
    or with SWIGLU (columns interleaved gate, up) silu(gate) * up."""
    if SWIGLU:
        pair = tl.reshape(acc, (acc.shape[0], BLOCK_N // 2, 2))
        half = tl.arange(0, 2)[None, None, :]
        gate = tl.sum(tl.where(half == 0, pair, 0.0), axis=2)
        up = tl.sum(tl.where(half == 1, pair, 0.0), axis=2)
        out = gate / (1.0 + tl.exp(-gate)) * up
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    else:
        out = acc
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N_OUT)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N_OUT, other=0.0)[None, :]
    if HAS_RES:
        out += tl.load(res_ptr + rows[:, None] * N_OUT + cols[None, :], mask=mask, other=0.0)
    tl.store(y_ptr + rows[:, None] * N_OUT + cols[None, :], out, mask=mask)


@triton.jit
def qgemv_kernel(
    x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, bias_ptr, res_ptr, norm_w_ptr, normed_ptr,
    M, N_OUT, steps, row_units, steps_per_split, splits, stride_xm, eps,
    QTYPE: tl.constexpr, STEP_BYTES: tl.constexpr, ROW_ALIGN: tl.constexpr, SPLIT: tl.constexpr,
    SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM_CHUNK: tl.constexpr, ASM: tl.constexpr,
    PREFETCH: tl.constexpr, PREFETCH_CHUNKS: tl.constexpr,
):
    """Program (pid_n, split): BLOCK_N weight rows over K steps [split * steps_per_split, ...),
    for every row of x; with SPLIT the last of a row block's `splits` programs adds their
    partials (module doc). A row is `row_units * ROW_ALIGN` bytes and a step STEP_BYTES, both
    constant multiples, so the compiler knows how far block addresses are aligned and loads
    runs of 2+ bytes at once (Q6_K's 210-byte blocks: 2-byte loads; passed as plain integers it
    assumed 1)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_N)
    out_col, row_start = _weight_row(w_ptr, pid_n, j, N_OUT, row_units * ROW_ALIGN, SWIGLU, BLOCK_N)
    if BLOCK_M == 1:  # per lane (_rows): the (A, B) tile of a step's sub-blocks
        if QTYPE == 1:
            acc = tl.zeros((BLOCK_N, 4, 32), dtype=tl.float32)
        elif QTYPE == 2 or QTYPE == 3:
            acc = tl.zeros((BLOCK_N, 4, 16), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, 4, 32 // RUN, 1), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, steps)
    if PREFETCH > 0:
        # one address a thread: every 32-byte sector of a row's step (its start + 32 c, the
        # last at its last byte), for the BLOCK_N rows; row r's sectors are PREFETCH_CHUNKS
        # consecutive slots of a flat range, so no thread holds two or the same one
        slot = tl.arange(0, BLOCK_N * PREFETCH_CHUNKS)
        sector = tl.minimum(32 * (slot % PREFETCH_CHUNKS), STEP_BYTES - 1)
        prefetch_start = _weight_row(w_ptr, pid_n, slot // PREFETCH_CHUNKS, N_OUT, row_units * ROW_ALIGN, SWIGLU,
                                     BLOCK_N)[1] + sector
    for kb in range(first, last):
        row = row_start + kb * STEP_BYTES
        if PREFETCH > 0:  # a later step of this program's range (the last one again near its end)
            _prefetch_l2(prefetch_start, tl.minimum(kb + PREFETCH, last - 1), STEP_BYTES)
        x_step = x_ptr + kb * 256
        if QTYPE == 1:
            acc = _step_q4_k(acc, x_step, stride_xm, M, rows, row, BLOCK_M, ASM)
        elif QTYPE == 2:
            acc = _step_q6_k(acc, x_step, stride_xm, M, rows, row, BLOCK_M, ASM)
        elif QTYPE == 3:
            acc = _step_q5_0(acc, x_step, stride_xm, M, rows, row, BLOCK_M, ASM)
        else:
            acc = _step_q8_0(acc, x_step, stride_xm, M, rows, row, BLOCK_M, ASM)
    if BLOCK_M == 1:
        if QTYPE == 1 or QTYPE == 2 or QTYPE == 3:
            acc = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
        else:
            acc = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)[None, :]
    if SPLIT:
        # partials: (splits, BLOCK_M, row blocks * BLOCK_N), every slot written (padding rows too)
        width = tl.num_programs(0) * BLOCK_N
        slot = part_ptr + rows[:, None] * width + (pid_n * BLOCK_N + j)[None, :]
        tl.store(slot + split * BLOCK_M * width, acc)
        finisher = last_to_arrive(count_ptr + pid_n, splits)
        if finisher:  # add the row block's partials in split order
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(splits):
                acc += tl.load(slot + s * BLOCK_M * width, cache_modifier=".cg")  # not L1: other SMs wrote it
    else:
        finisher = True
    if finisher:
        _finish(acc, y_ptr, bias_ptr, res_ptr, M, N_OUT, pid_n, rows, HAS_BIAS, HAS_RES, SWIGLU, BLOCK_N)
        if NORM:
            _norm_if_last(y_ptr, norm_w_ptr, normed_ptr, count_ptr + tl.num_programs(0), M, N_OUT, eps, BLOCK_M,
                          NORM_CHUNK)


@triton.jit
def _norm_if_last(y_ptr, w_ptr, normed_ptr, count_ptr, M, N_OUT, eps, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """The last row block to finish (of the launch's) writes RMSNorm(y) for every row of y."""
    if last_to_arrive(count_ptr, tl.num_programs(0)):
        for i in tl.static_range(BLOCK_M):
            if i < M:
                norm_row(y_ptr + i * N_OUT, y_ptr, w_ptr, normed_ptr + i * N_OUT, y_ptr, N_OUT, eps, False, CHUNK,
                         ".cg")


def qgemv(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, k: int, bias: torch.Tensor | None = None,
          residual: torch.Tensor | None = None, swiglu: bool = False, block_n: int | None = None,
          split_k: int | None = None, num_warps: int | None = None, norm_weight: torch.Tensor | None = None,
          norm_eps: float = 0.0, prefetch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (M <= 8, K) float, raw (N, row_bytes) uint8 -> float32 `y = x @ dequant(raw).T + bias +
    residual` (M, N); with `swiglu` the N rows are [gate; up] and y is
    `silu(x @ gate.T) * (x @ up.T)` (M, N / 2). Returns (y, RMSNorm(y) * norm_weight with
    `norm_eps`, or None without a norm_weight). Checks are the caller's (qmatmul.qmatmul).

    `split_k` K-ranges (default: ~PROGRAMS_PER_CORE programs per GPU core, at most one per step)
    of `block_n` rows (default BLOCK_N on a GPU, INTERPRETED_BLOCK_N in the interpreter), with
    `num_warps` (default NUM_WARPS), each prefetching into L2 the step `prefetch` steps ahead
    (default PREFETCH on an NVIDIA GPU; none where inline PTX cannot run: Triton's interpreter,
    ROCm)."""
    blk, size = GGML_QUANT_SIZES[qtype]
    m = x.shape[0]
    gpu = target(x.device)
    block_n = block_n or (INTERPRETED_BLOCK_N if gpu == INTERPRETER else BLOCK_N)
    steps = k // STEP
    row_bytes = k // blk * size
    align = math.gcd(row_bytes, 16)
    n_out = n // 2 if swiglu else n
    n_blocks = triton.cdiv(n_out, block_n // 2 if swiglu else block_n)
    if split_k is None:
        programs = INTERPRETED_PROGRAMS if gpu == INTERPRETER else PROGRAMS_PER_CORE * gpu.cores
        split_k = max(1, min(steps, programs // n_blocks))
    per = triton.cdiv(steps, split_k)
    splits = triton.cdiv(steps, per)
    block_m = max(1, triton.next_power_of_2(m))
    dummy = x  # a pointer for absent operands (never read)
    bias_arg = bias.float().contiguous() if bias is not None else dummy
    res_arg = residual.float().contiguous() if residual is not None else dummy
    y = torch.empty(m, n_out, dtype=torch.float32, device=x.device)
    parts = torch.empty(splits, block_m, n_blocks * block_n, dtype=torch.float32, device=x.device) \
        if splits > 1 else y
    norm = norm_weight is not None
    count = counters(x.device, n_blocks + norm) if splits > 1 or norm else y  # row blocks', then the launch's
    normed = torch.empty_like(y) if norm else None
    qgemv_kernel[(n_blocks, splits)](
        x, raw, y, parts, count, bias_arg, res_arg, norm_weight.float().contiguous() if norm else dummy,
        normed if normed is not None else dummy, m, n_out, steps, row_bytes // align, per, splits, x.stride(0),
        norm_eps, QTYPE=QTYPE_IDS[qtype], STEP_BYTES=STEP // blk * size, ROW_ALIGN=align, SPLIT=splits > 1,
        SWIGLU=swiglu, HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=norm, BLOCK_M=block_m,
        BLOCK_N=block_n, NORM_CHUNK=min(NORM_CHUNK, triton.next_power_of_2(n_out)), ASM=gpu.ptx,
        PREFETCH=0 if not gpu.ptx else PREFETCH if prefetch is None else prefetch,
        PREFETCH_CHUNKS=triton.next_power_of_2(triton.cdiv(STEP // blk * size, 32) + 1),
        num_warps=num_warps or NUM_WARPS)
    return y, normed
