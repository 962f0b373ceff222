"""Batch-1 Q4_K, Q5_K and Q6_K GEMVs on int8 activations: four products an instruction (`dp4a`), as
llama.cpp's CUDA `mul_mat_vec_q` does; the epilogues (bias, residual, SwiGLU, the next RMSNorm)
and split-K finishing are qgemv.py's own (`finish_rows`). Taken by qmatmul.py with
QVL_INT8_GEMV=1; not the default until a GPU has timed it and its effect on logits is weighed.

qgemv.py turns every code into a float and multiplies it by a float32 activation: on an H200
its Q4_K loop is ~178 SASS instructions a 256-weight step of 16 rows (~5.6 a weight), so it is
bound by issuing instructions at ~46 % of the copy bandwidth (docs/benchmarks.md), where the
issue asks for 75 %. Here x is quantized per 32 values to int8 (a scale dx = max|x| / 127 and
the sum dx * sum(q) per block, as ggml's q8_1, and the integer sums per 16: q8_activations.py)
by whatever wrote x on the decode step (the norms, the SwiGLU GEMV, decode attention), or else
in a launch of its own (`quantize_q8`), and

    Q4_K, Q5_K, a sub-block of 32:  d * sc * dx * sum(code * q)  -  dmin * m * (dx * sum(q))
    Q6_K, a sub-block of 16:  d * scale * dx * (sum(code * q) - 32 * sum(q))

with sum(code * q) over words of 4 codes by `dp4a.u32.s32` (codes unsigned: nibbles, or Q6_K's
6 bits without its offset 32; activations signed bytes): the codes never become floats. The
result differs from qgemv's by x's rounding to 8 bits (a relative error of ~2^-8 of each
block's largest |x| per value; tolerance in the tests). In Triton's interpreter and without
inline PTX (ASM False) the dot products come from plain integer ops.

Work layout: program (row block, K split) walks its steps, 8 rows on one warp, 64 weights a
thread a step, accumulated per lane (no reduction across threads inside the loop). Q4_K: a
thread holds a group's 8 words of its row (2 x 16-byte loads). Q6_K: 12 words of codes and
high bits a thread; its blocks are 210 bytes, so where rows are 4-byte aligned the loop takes
steps in pairs: the even step's words are 32-bit loads, the odd step's (2 bytes off) each
funnel-shifted from the two aligned words it straddles; else each word is two 16-bit loads.
Compiled for sm_90 (scripts/compile_kernels.py, Triton 3.8 here): Q4_K 115 SASS instructions a
step (16 IDP.4A, 4 I2F, no barrier or shuffle), ~1.8 a weight, against ~5.6 for qgemv.py's
float loop; Q5_K 163 (its fifth bits from qh, the same 8 words for a row's 4 threads), ~2.5,
against ~6.2; Q6_K 340-347 a pair of steps, ~2.7 a weight (186-191 a step with 16-bit loads,
~3.0), against ~7.2 (226-235 a step of 32 weights a thread).
Torch reference: `qgemv_q8_ref` (float64 of the same integer sums and scales).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .q8_activations import Q8_BLOCK, Q8Activations, recall, remember, store_q8
from .qblocks import STEP, f16_at, q4_k_scale_pairs
from .qgemv import INTERPRETED_BLOCK_N, Outputs, _weight_row, finish_rows, k_splits
from .rmsnorm import CHUNK as NORM_CHUNK
from .target import INTERPRETER, target

BLOCK_N = 8
NUM_WARPS = 1
TYPES = {T.Q4_K: 1, T.Q6_K: 2, T.Q5_K: 3}  # the weight types taken, and the kernel's QTYPE for each


@triton.jit
def quantize_q8_kernel(x_ptr, q_ptr, d_ptr, s_ptr, s16_ptr, K, BLOCKS: tl.constexpr):
    """Program p: BLOCKS blocks of 32 values of x (q8_activations.store_q8)."""
    start = tl.program_id(0) * BLOCKS * 32
    offs = start + tl.arange(0, BLOCKS * 32)
    store_q8(tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32), start, K, q_ptr, d_ptr, s_ptr,
             s16_ptr, BLOCKS)


def quantize_q8(x: torch.Tensor) -> Q8Activations:
    """x (K,) float, K a multiple of 32 -> its Q8Activations, in a launch of its own."""
    k = x.numel()
    out = Q8Activations.empty(k, x.device)
    blocks = 8
    quantize_q8_kernel[(triton.cdiv(k // Q8_BLOCK, blocks),)](x.contiguous(), out.q, out.d, out.s, out.s16, k,
                                                              BLOCKS=blocks)
    return out


@triton.jit
def _dp4a(a, b, ASM: tl.constexpr):
    """sum over the 4 bytes of unsigned a (codes < 64) times signed b, per element (int32)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, tl.zeros_like(a)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    s = (a & 255) * ((b << 24) >> 24)
    s += ((a >> 8) & 255) * ((b << 16) >> 24)
    s += ((a >> 16) & 255) * ((b << 8) >> 24)
    s += ((a >> 24) & 255) * (b >> 24)
    return s


@triton.jit
def _q4_k_step(acc, row, x32, dx_ptr, sx_ptr, kb, Q5: tl.constexpr, ASM: tl.constexpr):
    """acc (BLOCK_N, 4) += step kb of the Q4_K (Q5: Q5_K) rows at byte pointers row (BLOCK_N,).
    Thread (row, g) takes group g: sub-blocks 2g (low nibbles) and 2g + 1 (high) of qs's 32
    bytes at 16 + 32g (Q5_K: 48 + 32g), two 16-byte runs (the halves of the group's 8 words,
    loaded in one layout). Q5_K's fifth bits: bits 2g and 2g + 1 of qh's byte l (qh at 16, the
    same 8 words for every group), each set under its nibble (code 0..31); scales, mins and
    the rest are Q4_K's."""
    g = tl.arange(0, 4)
    v = tl.arange(0, 4)  # a run of 4 words (16 bytes: one load)
    word = 8 * g[:, None] + v[None, :]  # (4, 4): words of qs, first half of each group's 8
    xword = 16 * g[:, None] + v[None, :]  # x's words for sub-block 2g, first half
    dot_lo = tl.zeros(acc.shape, dtype=tl.int32)
    dot_hi = tl.zeros(acc.shape, dtype=tl.int32)
    words = row.to(tl.pointer_type(tl.int32))[:, None, None]
    for h in tl.static_range(2):
        qs = tl.load(words + (12 if Q5 else 4) + 4 * h + word[None, :, :])
        lo = qs & 0x0F0F0F0F
        hi = (qs >> 4) & 0x0F0F0F0F
        if Q5:
            # l = 16h + 4v ..., loaded whole by each group's thread (as (row, 1, v) the load took
            # another layout: 295 SASS a step, 32 shuffles, 5 barriers)
            qh = tl.load(words + 4 + 4 * h + (word - 8 * g[:, None])[None, :, :])
            shift = 2 * g[None, :, None]
            lo |= ((qh >> shift) & 0x01010101) << 4
            hi |= ((qh >> (shift + 1)) & 0x01010101) << 4
        xlo = tl.load(x32 + kb * 64 + 4 * h + xword)[None, :, :]
        xhi = tl.load(x32 + kb * 64 + 8 + 4 * h + xword)[None, :, :]
        dot_lo += tl.sum(_dp4a(lo, xlo, ASM), axis=2)
        dot_hi += tl.sum(_dp4a(hi, xhi, ASM), axis=2)
    d = f16_at(row)[:, None]
    dmin = f16_at(row + 2)[:, None]
    sc_lo, m_lo, sc_hi, m_hi = q4_k_scale_pairs(row, g)  # (BLOCK_N, 4)
    dx_lo = tl.load(dx_ptr + kb * 8 + 2 * g)[None, :]
    dx_hi = tl.load(dx_ptr + kb * 8 + 2 * g + 1)[None, :]
    sx_lo = tl.load(sx_ptr + kb * 8 + 2 * g)[None, :]
    sx_hi = tl.load(sx_ptr + kb * 8 + 2 * g + 1)[None, :]
    return acc + (d * (sc_lo * dx_lo * dot_lo.to(tl.float32) + sc_hi * dx_hi * dot_hi.to(tl.float32))
                  - dmin * (m_lo * sx_lo + m_hi * sx_hi))


@triton.jit
def _words_at(half_ptr):
    """32-bit little-endian words from pairs of 16-bit loads at int16 pointers half_ptr (Q6_K's
    210-byte blocks are 2-byte aligned)."""
    lo = tl.load(half_ptr).to(tl.int32) & 0xFFFF
    hi = tl.load(half_ptr + 1).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def _q6_k_words(row, offs, ALIGN: tl.constexpr):
    """Words of a Q6_K block at byte pointers row (BLOCK_N,), at word offsets offs (v, t). ALIGN
    4: rows 4-byte aligned, one 32-bit load a word; 2: rows 2 bytes past a 4-byte boundary, each
    word from the two aligned words it straddles (two 32-bit loads and a funnel shift); 0:
    two 16-bit loads a word."""
    if ALIGN == 4:
        return tl.load(row.to(tl.pointer_type(tl.int32))[None, None, :] + offs[:, :, None])
    if ALIGN == 2:
        words = (row - 2).to(tl.pointer_type(tl.int32))[None, None, :] + offs[:, :, None]
        return ((tl.load(words) >> 16) & 0xFFFF) | (tl.load(words + 1) << 16)
    return _words_at(row.to(tl.pointer_type(tl.int16))[None, None, :] + 2 * offs[:, :, None])


@triton.jit
def _q6_k_step(acc, row, x32, dx_ptr, s16_ptr, kb, one, ALIGN: tl.constexpr, ASM: tl.constexpr):
    """acc (4, BLOCK_N) += step kb of the Q6_K rows at byte pointers row (BLOCK_N,). Thread
    (t, row) takes half t // 2 of the 32 positions l of 128-weight half h = t % 2: words vv =
    4 (t // 2) + v (v < 4) of ql's 64 bytes at 64h (A), at 64h + 32 (B) and of qh's 32 at 128 +
    32h (H). Weight 128h + 32 quarter + l has the code (0..63) of quarter 0: A's low nibble
    with H's bits 0-1 above, 1: B's low nibble, bits 2-3, 2: A's high nibble, bits 4-5, 3: B's
    high nibble, bits 6-7; dp4a takes the codes unsigned and the offset 32 comes off as 32 x
    the sum of x's codes per 16 (quantize_q8), once per sub-block (8h + 2 quarter + t // 2).

    The blocks are 210 bytes, so a step's words are 4-byte aligned or 2 bytes off (ALIGN,
    _q6_k_words). Tensors are (v, t, row), rows last: as (row, t, v) Triton spread a thread's
    4 words (not one contiguous load) over 4 threads, and the step took 302 SASS instructions
    with 32 shuffles and 4 barriers. For the same reason the word offsets are multiplied by
    `one` (1 as x // x of a kernel argument, which LLVM folds): seen as constants, their runs of
    4 consecutive 4-byte words made Triton spread each run over 4 threads for coalescing (486
    instructions a pair of steps, 32 shuffles, 4 barriers, against 342)."""
    t = tl.arange(0, 4)
    v = tl.arange(0, 4)
    h = (t % 2)[None, :]
    vv = (4 * (t // 2))[None, :] + v[:, None]  # (v, t)
    a = _q6_k_words(row, (16 * h + vv) * one, ALIGN)  # (v, t, row)
    b = _q6_k_words(row, (16 * h + 8 + vv) * one, ALIGN)
    hb = _q6_k_words(row, (32 + 8 * h + vv) * one, ALIGN)
    sub = 8 * (t % 2) + t // 2  # quarter 0's sub-block; quarter q's is sub + 2q
    xw = x32 + kb * 64 + (32 * h + vv)[:, :, None]  # quarter 0's x words; quarter q's + 8q
    part0 = _q6_k_quarter(a, hb, xw, row, s16_ptr, dx_ptr, kb, sub, t, 0, ASM)
    part1 = _q6_k_quarter(b, hb, xw, row, s16_ptr, dx_ptr, kb, sub, t, 1, ASM)
    part2 = _q6_k_quarter(a >> 4, hb, xw, row, s16_ptr, dx_ptr, kb, sub, t, 2, ASM)
    part3 = _q6_k_quarter(b >> 4, hb, xw, row, s16_ptr, dx_ptr, kb, sub, t, 3, ASM)
    return acc + f16_at(row + 208)[None, :] * ((part0 + part1) + (part2 + part3))


@triton.jit
def _q6_k_quarter(nib, hb, xw, row, s16_ptr, dx_ptr, kb, sub, t, QUARTER: tl.constexpr, ASM: tl.constexpr):
    """A quarter's share of a Q6_K step, without d: (4, BLOCK_N) sums scale * dx * (code . q -
    32 sum(q)) over each thread's 16 weights (4 words) of sub-block sub + 2 QUARTER."""
    codes = (nib & 0x0F0F0F0F) | (((hb >> (2 * QUARTER)) << 4) & 0x30303030)
    dot = tl.sum(_dp4a(codes, tl.load(xw + 8 * QUARTER), ASM), axis=0)
    s16 = tl.load(s16_ptr + kb * 16 + sub + 2 * QUARTER)[:, None]
    # t's order (t = half * 2 + h) keeps sub without runs: as 2h + half, the analysis read runs of 2 in
    # this load and gave it another order of threads, and every quarter's product took a shuffle
    scale = tl.load(row[None, :] + 192 + sub[:, None] + 2 * QUARTER).to(tl.int8, bitcast=True).to(tl.float32)
    dx = tl.load(dx_ptr + kb * 8 + 4 * (t % 2) + QUARTER)[:, None]
    return scale * dx * (dot - 32 * s16).to(tl.float32)


@triton.jit
def qgemv_q8_kernel(xq_ptr, dx_ptr, sx_ptr, s16_ptr, w_ptr, y_ptr, part_ptr, count_ptr, bias_ptr, res_ptr,
                    norm_w_ptr, normed_ptr, nq_ptr, nd_ptr, ns_ptr, ns16_ptr, N_OUT, steps, row_units, steps_per_split,
                    splits, eps,
                    QTYPE: tl.constexpr, STEP_BYTES: tl.constexpr, ROW_ALIGN: tl.constexpr, PAIRED: tl.constexpr,
                    SPLIT: tl.constexpr,
                    SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                    Q8: tl.constexpr, BLOCK_N: tl.constexpr, NORM_CHUNK: tl.constexpr, ASM: tl.constexpr):
    """Program (row block, split): BLOCK_N weight rows (qgemv._weight_row: with SWIGLU gate and
    up rows interleaved) over K steps [split * steps_per_split, ...), then qgemv.finish_rows
    (partials, epilogue, norm). Rows are row_units * ROW_ALIGN bytes apart: with the constant
    factor (16 where the stride allows) the compiler knows the codes' 16-byte runs are aligned
    and loads each in one instruction (as a plain integer stride it assumed 4 bytes: 288
    instructions a step, not 115)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    _, row_start = _weight_row(w_ptr, pid_n, tl.arange(0, BLOCK_N), N_OUT, row_units * ROW_ALIGN, SWIGLU, BLOCK_N)
    # per lane: no reduction across threads in the loop; Q4_K, Q5_K (row, group), Q6_K (group, row)
    acc = tl.zeros((4, BLOCK_N) if QTYPE == 2 else (BLOCK_N, 4), dtype=tl.float32)
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, steps)
    x32 = xq_ptr.to(tl.pointer_type(tl.int32))
    if QTYPE != 2:
        for kb in range(first, last):
            acc = _q4_k_step(acc, row_start + kb * STEP_BYTES, x32, dx_ptr, sx_ptr, kb, QTYPE == 3, ASM)
    elif PAIRED:  # Q6_K rows 4-byte aligned, splits starting at even steps: steps in pairs, the even
        # one 4-byte aligned, the odd one 2 bytes past (STEP_BYTES 210)
        one = (row_units * 16) // (row_units * 16)  # 1, unknown to Triton's analysis: see _q6_k_step
        for kb in range(first, last - 1, 2):
            row = row_start + (kb // 2) * (2 * STEP_BYTES)
            acc = _q6_k_step(acc, row, x32, dx_ptr, s16_ptr, kb, one, 4, ASM)
            acc = _q6_k_step(acc, row + STEP_BYTES, x32, dx_ptr, s16_ptr, kb + 1, one, 2, ASM)
        if (last - first) % 2:  # an even last step
            acc = _q6_k_step(acc, row_start + (last - 1) * STEP_BYTES, x32, dx_ptr, s16_ptr, last - 1, one, 4, ASM)
    else:
        for kb in range(first, last):
            acc = _q6_k_step(acc, row_start + kb * STEP_BYTES, x32, dx_ptr, s16_ptr, kb, 1, 0, ASM)
    finish_rows(tl.sum(acc, axis=0 if QTYPE == 2 else 1)[None, :], pid_n, split, splits, tl.arange(0, 1), y_ptr,
                part_ptr, count_ptr, bias_ptr, res_ptr, norm_w_ptr, normed_ptr, nq_ptr, nd_ptr, ns_ptr, ns16_ptr, 1,
                N_OUT, eps, SPLIT, SWIGLU, HAS_BIAS, HAS_RES, NORM, Q8, 1, BLOCK_N, NORM_CHUNK)


def qgemv_q8(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, k: int, bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, swiglu: bool = False, norm_weight: torch.Tensor | None = None,
             norm_eps: float = 0.0, block_n: int | None = None, num_warps: int | None = None,
             split_k: int | None = None, q8_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (1, K) float, raw (N, K's bytes) uint8 Q4_K, Q5_K or Q6_K rows (rows of contiguous bytes,
    4-byte (Q6_K: 2-byte) aligned, possibly further apart: the first K columns of a wider
    weight) -> float32 (1, N) `q8(x) @ dequant(raw).T + bias + residual`, or with `swiglu` (N
    rows [gate; up]) `silu(q8(x) @ gate.T) * (q8(x) @ up.T)` (1, N / 2); and RMSNorm(y) *
    norm_weight, or None (qgemv.qgemv's epilogues; `q8_out`: the int8 form of the norm's output,
    or of y, made by the same launch for the next int8 GEMV, q8_activations.py). Default splits
    as qgemv's (qgemv.k_splits)."""
    if qtype not in TYPES:
        raise ValueError(f"qgemv_q8 takes {', '.join(t.name for t in TYPES)} weights, not {qtype.name}")
    blk, size = GGML_QUANT_SIZES[qtype]
    row_bytes = k // blk * size
    align = 2 if qtype == T.Q6_K else 4
    if (x.shape[0] != 1 or k % STEP or raw.shape != (n, row_bytes) or raw.stride(-1) != 1
            or raw.stride(0) % align or raw.data_ptr() % align or (n > 1 and raw.stride(0) < row_bytes)
            or (swiglu and n % 2)):
        raise ValueError(f"qgemv_q8: x (1, {k}) and {align}-byte aligned {qtype.name} rows ({n}, {row_bytes}), K a "
                         f"multiple of {STEP}{', N even for SwiGLU' if swiglu else ''}; got x {tuple(x.shape)}, raw "
                         f"{tuple(raw.shape)} with strides {raw.stride()}")
    gpu = target(x.device)
    block_n = block_n or (INTERPRETED_BLOCK_N if gpu == INTERPRETER else BLOCK_N)
    num_warps = num_warps or NUM_WARPS
    steps = k // STEP
    n_out = n // 2 if swiglu else n
    blocks = triton.cdiv(n_out, block_n // 2 if swiglu else block_n)
    per, splits = k_splits(gpu, steps, blocks, num_warps, split_k)
    # Q6_K rows 4-byte aligned: steps in pairs, so that even steps read 32-bit words; splits start even
    paired = qtype == T.Q6_K and raw.data_ptr() % 4 == 0 and raw.stride(0) % 4 == 0
    if paired and per % 2 and per < steps:
        per += 1
        splits = triton.cdiv(steps, per)
    xq = recall(x)  # a norm's output quantized by the GEMV that wrote it, or an x quantized for another GEMV
    if xq is None:
        xq = quantize_q8(x.reshape(-1).float())
        remember(x, xq)
    out = Outputs.make(x, 1, n_out, blocks, block_n, splits, bias, residual, norm_weight, q8_out)
    row_align = math.gcd(raw.stride(0), 16)
    qgemv_q8_kernel[(blocks, splits)](
        xq.q, xq.d, xq.s, xq.s16, raw, *out.args(), n_out, steps, raw.stride(0) // row_align, per, splits, norm_eps,
        QTYPE=TYPES[qtype], STEP_BYTES=STEP // blk * size, ROW_ALIGN=row_align, PAIRED=paired,
        SPLIT=splits > 1, SWIGLU=swiglu,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=out.normed is not None,
        Q8=out.q8 is not None, BLOCK_N=block_n,
        NORM_CHUNK=min(NORM_CHUNK, 256 * num_warps, triton.next_power_of_2(n_out)),  # 8 values a thread
        ASM=gpu.ptx, num_warps=num_warps)
    return out.y, out.normed


def qgemv_q8_ref(x: torch.Tensor, raw: np.ndarray, qtype: T) -> torch.Tensor:
    """The same arithmetic in numpy float64: x's int8 codes and scales as quantize_q8 makes them
    (float32 scale, round half away from zero), the weights dequantized by gguf-py."""
    from gguf.quants import dequantize

    xs = x.reshape(-1, Q8_BLOCK).double().numpy()
    amax = np.abs(xs).max(axis=1, keepdims=True)
    safe = np.where(amax > 0, amax, 1.0).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / safe, 0).astype(np.float32)
    q = np.trunc(xs.astype(np.float32) * inv + np.where(xs >= 0, 0.5, -0.5).astype(np.float32))
    dx = (amax.astype(np.float32) / np.float32(127.0)).astype(np.float64)
    w = np.asarray(dequantize(raw, qtype), dtype=np.float64).reshape(raw.shape[0], -1)
    return torch.from_numpy(w @ (q * dx).reshape(-1))[None]
