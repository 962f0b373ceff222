"""Batch-1 Q4_K GEMV on int8 activations: four products an instruction (`dp4a`), as llama.cpp's
CUDA `mul_mat_vec_q` does. A prototype beside qgemv.py, not on the decode path yet.

qgemv.py turns every 4-bit code into a float and multiplies it by a float32 activation: on an
H200 its Q4_K loop is ~178 SASS instructions a 256-weight step of 16 rows (~5.6 a weight), so it
is bound by issuing instructions at ~46 % of the copy bandwidth (docs/benchmarks.md), where the
issue asks for 75 %. Here x is first quantized per 32 values to int8 (`quantize_q8`: a scale
dx = max|x| / 127 and the sum dx * sum(q) per block, as ggml's q8_1), and a Q4_K sub-block of 32
weights contributes

    d * sc * dx * sum(code * q)  -  dmin * m * (dx * sum(q))

with sum(code * q) over 8 words of 4 codes by `dp4a.u32.s32` (the codes are nibbles, the
activations signed bytes): the codes never become floats, one integer-to-float conversion a
thread's 4 words. The result differs from qgemv's by x's rounding to 8 bits (a relative error
of ~2^-8 of each block's largest |x| per value; tolerance in the tests), which is why this is
not the default: it must first be measured on a GPU, against the float path, for speed and
for what it does to a model's logits. In Triton's interpreter and without inline PTX (ASM
False) the dot products come from plain integer ops.

Work layout: program (row block, K split) walks its steps; a step's codes are two (BLOCK_N, 4
groups, 4 words) int32 tiles, the halves of each group's 8 words, loaded in one layout so that a
thread holds a group's 8 words of its row (2 x 16-byte loads) and sums their products in
registers; the float accumulator is per lane (no reduction across threads inside the loop);
splits combine by last-to-arrive (arrival.py), in split order. Compiled for sm_90
(scripts/compile_kernels.py, Triton 3.8 here): 115 SASS instructions a step of 8 rows on one
warp (16 of them IDP.4A, 4 I2F, no barrier or shuffle), 64 weights a thread: ~1.8 a weight,
against ~5.6 for qgemv.py's float loop (178 a step, 32 weights a thread). An earlier layout
(each thread 4 of a group's words, reduced across threads each step) took 100 a step for 32
weights (SHFL.BFLY 4), ~3.1 a weight.
Torch reference: `qgemv_q8_ref` (float64 of the same integer sums and scales).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from .arrival import counters, last_to_arrive
from .qblocks import STEP, f16_at, q4_k_scale_pairs
from .qgemv import k_splits
from .target import target

Q8_BLOCK = 32  # activations a scale
BLOCK_N = 8
NUM_WARPS = 1
Q4_K_BYTES = 144


@triton.jit
def quantize_q8_kernel(x_ptr, q_ptr, d_ptr, s_ptr, K, BLOCKS: tl.constexpr):
    """Program p: BLOCKS blocks of 32 values of x -> int8 codes, dx (max|x| / 127) and dx * sum(q)."""
    b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    i = tl.arange(0, 32)
    offs = b[:, None] * 32 + i[None, :]
    mask = offs < K
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    d = amax / 127.0
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    q = (x * inv[:, None] + tl.where(x >= 0, 0.5, -0.5)).to(tl.int32)  # rounded half away from zero
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(d_ptr + b, d, mask=b * 32 < K)
    tl.store(s_ptr + b, d * tl.sum(q, axis=1).to(tl.float32), mask=b * 32 < K)


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (K,) float, K a multiple of 32 -> (codes (K,) int8, dx (K / 32,) float32, dx * sum(codes) (K / 32,))."""
    k = x.numel()
    q = torch.empty(k, dtype=torch.int8, device=x.device)
    d = torch.empty(k // Q8_BLOCK, dtype=torch.float32, device=x.device)
    s = torch.empty_like(d)
    blocks = 8
    quantize_q8_kernel[(triton.cdiv(k // Q8_BLOCK, blocks),)](x.contiguous(), q, d, s, k, BLOCKS=blocks)
    return q, d, s


@triton.jit
def _dp4a(a, b, ASM: tl.constexpr):
    """sum over the 4 bytes of unsigned a (codes < 16) times signed b, per element (int32)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, tl.zeros_like(a)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    s = (a & 255) * ((b << 24) >> 24)
    s += ((a >> 8) & 255) * ((b << 16) >> 24)
    s += ((a >> 16) & 255) * ((b << 8) >> 24)
    s += ((a >> 24) & 255) * (b >> 24)
    return s


@triton.jit
def qgemv_q8_kernel(xq_ptr, dx_ptr, sx_ptr, w_ptr, y_ptr, part_ptr, count_ptr, N, steps, row_units, steps_per_split,
                    splits, ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """Program (row block, split): rows pid_n * BLOCK_N ... over K steps [split * steps_per_split,
    ...). Rows are row_units * ROW_ALIGN bytes apart: with the constant factor (16 where the
    stride allows) the compiler knows the codes' 16-byte runs are aligned and loads each in one
    instruction (as a plain integer stride it assumed 4 bytes: 288 instructions a step, not 115)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row0 = w_ptr + tl.where(rn < N, rn, 0).to(tl.int64) * (row_units * ROW_ALIGN)  # rows past N: row 0, not stored
    g = tl.arange(0, 4)  # groups: sub-blocks 2g (low nibbles) and 2g + 1 (high)
    v = tl.arange(0, 4)  # a run of 4 words (16 bytes: one load)
    word = 8 * g[:, None] + v[None, :]  # (4, 4): words of qs, first half of each group's 8
    xword = 16 * g[:, None] + v[None, :]  # x's words for sub-block 2g, first half
    acc = tl.zeros((BLOCK_N, 4), dtype=tl.float32)
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, steps)
    x32 = xq_ptr.to(tl.pointer_type(tl.int32))
    for kb in range(first, last):
        row = row0 + kb * 144
        dot_lo = tl.zeros((BLOCK_N, 4), dtype=tl.int32)
        dot_hi = tl.zeros((BLOCK_N, 4), dtype=tl.int32)
        for h in tl.static_range(2):  # the two halves as two loads of one layout: a thread holds both
            qs = tl.load(row.to(tl.pointer_type(tl.int32))[:, None, None] + 4 + 4 * h + word[None, :, :])
            xlo = tl.load(x32 + kb * 64 + 4 * h + xword)[None, :, :]
            xhi = tl.load(x32 + kb * 64 + 8 + 4 * h + xword)[None, :, :]
            dot_lo += tl.sum(_dp4a(qs & 0x0F0F0F0F, xlo, ASM), axis=2)
            dot_hi += tl.sum(_dp4a((qs >> 4) & 0x0F0F0F0F, xhi, ASM), axis=2)
        d = f16_at(row)[:, None]
        dmin = f16_at(row + 2)[:, None]
        sc_lo, m_lo, sc_hi, m_hi = q4_k_scale_pairs(row, g)  # (BLOCK_N, 4)
        dx_lo = tl.load(dx_ptr + kb * 8 + 2 * g)[None, :]
        dx_hi = tl.load(dx_ptr + kb * 8 + 2 * g + 1)[None, :]
        sx_lo = tl.load(sx_ptr + kb * 8 + 2 * g)[None, :]
        sx_hi = tl.load(sx_ptr + kb * 8 + 2 * g + 1)[None, :]
        acc += (d * (sc_lo * dx_lo * dot_lo.to(tl.float32) + sc_hi * dx_hi * dot_hi.to(tl.float32))
                - dmin * (m_lo * sx_lo + m_hi * sx_hi))
    y = tl.sum(acc, axis=1)
    if splits > 1:
        slot = part_ptr + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        width = tl.num_programs(0) * BLOCK_N
        tl.store(slot + split * width, y)
        if last_to_arrive(count_ptr + pid_n, splits):
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in range(splits):
                y += tl.load(slot + s * width, cache_modifier=".cg")
            tl.store(y_ptr + rn, y, mask=rn < N)
    else:
        tl.store(y_ptr + rn, y, mask=rn < N)


def qgemv_q8(x: torch.Tensor, raw: torch.Tensor, n: int, k: int, block_n: int | None = None,
             num_warps: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x (1, K) float, raw (N, K / 256 * 144) uint8 Q4_K rows (rows of contiguous bytes, 4-byte
    aligned, possibly further apart: the first K columns of a wider weight) -> float32 (1, N) =
    q8(x) @ dequant(raw).T. Default splits as qgemv's (qgemv.k_splits)."""
    row_bytes = k // STEP * Q4_K_BYTES
    if (x.shape[0] != 1 or k % STEP or raw.shape != (n, row_bytes) or raw.stride(-1) != 1
            or raw.stride(0) % 4 or raw.data_ptr() % 4 or (n > 1 and raw.stride(0) < row_bytes)):
        raise ValueError(f"qgemv_q8: x (1, {k}) and 4-byte aligned Q4_K rows ({n}, {row_bytes}), K a multiple of "
                         f"{STEP}; got x {tuple(x.shape)}, raw {tuple(raw.shape)} with strides {raw.stride()}")
    gpu = target(x.device)
    block_n, num_warps = block_n or BLOCK_N, num_warps or NUM_WARPS
    steps = k // STEP
    blocks = triton.cdiv(n, block_n)
    per, splits = k_splits(gpu, steps, blocks, num_warps, split_k)
    xq, dx, sx = quantize_q8(x.reshape(-1).float())
    y = torch.empty(1, n, dtype=torch.float32, device=x.device)
    parts = torch.empty(splits, blocks * block_n, dtype=torch.float32, device=x.device) if splits > 1 else y
    count = counters(x.device, blocks) if splits > 1 else y
    align = math.gcd(raw.stride(0), 16)
    qgemv_q8_kernel[(blocks, splits)](xq, dx, sx, raw, y, parts, count, n, steps, raw.stride(0) // align, per, splits,
                                      ROW_ALIGN=align, BLOCK_N=block_n, ASM=gpu.ptx, num_warps=num_warps)
    return y


def qgemv_q8_ref(x: torch.Tensor, raw: np.ndarray) -> torch.Tensor:
    """The same arithmetic in numpy float64: x's int8 codes and scales as quantize_q8 makes them
    (float32 scale, round half away from zero), Q4_K's scales and codes from the blocks."""
    from gguf.quants import dequantize

    xs = x.reshape(-1, Q8_BLOCK).double().numpy()
    amax = np.abs(xs).max(axis=1, keepdims=True)
    safe = np.where(amax > 0, amax, 1.0).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127.0) / safe, 0).astype(np.float32)
    q = np.trunc(xs.astype(np.float32) * inv + np.where(xs >= 0, 0.5, -0.5).astype(np.float32))
    dx = (amax.astype(np.float32) / np.float32(127.0)).astype(np.float64)
    w = np.asarray(dequantize(raw, T.Q4_K), dtype=np.float64).reshape(raw.shape[0], -1)
    return torch.from_numpy(w @ (q * dx).reshape(-1))[None]
