"""Decode's dequantizing matrix-vector product (M <= 8 rows of x) straight from GGUF blocks.

Batch-1 decode streams every weight byte once per token, so this kernel is bound by memory
bandwidth. Program (row block, split) walks its K steps; each step's bytes go to products
through qgemv_steps.py (per type: the bytes read once in contiguous runs, scales applied once
per sub-block, codes turned to floats by inline PTX at batch 1). On an NVIDIA GPU each program
also asks L2 (`prefetch.global.L2`, one a thread, every 32-byte sector of its rows' step) for
the step PREFETCH steps ahead, so that more than the one 16-byte load a thread has in flight
per step keeps DRAM busy while it computes.

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
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .arrival import counters, last_to_arrive
from .q8_activations import Q8Activations, form_for, pointers, store_q8
from .qblocks import QTYPE_IDS, STEP
from .qgemv_steps import lane_sums, row_sums, step
from .qgrids import type_grid
from .rmsnorm import CHUNK as NORM_CHUNK
from .rmsnorm import norm_row
from .target import INTERPRETER, Target, target

BLOCK_N = 16  # weight rows per program on a GPU (see gemv_launch for sm_90)
NUM_WARPS = 4
# On a GPU, each program asks L2 for the weight bytes of the step this many steps ahead of the
# one it loads (0: no prefetch). A thread's loop loads one 16-byte run of weights a step, so
# without it a warp has 512 bytes in flight at a time; the prefetches keep later steps moving
# while it computes. H200 sweep (2026-12-04), 7B Q4_K gate/up at 4 rows on one warp: 0, 1, 2, 4
# steps ahead gave 1829, 1892, 1917, 1844 GB/s.
PREFETCH = 2
INTERPRETED_BLOCK_N = 128  # in Triton's interpreter, where each program costs milliseconds
# sm_90 batch-1 (block_n, num_warps, prefetch) by (type, SwiGLU stack), from bench_kernels.py
# --sweep on an H200 (Triton 3.6, 2026-12-04, CUDA-graph replay; docs/benchmarks.md). 7B gate/up
# stacked (Q4_K 37888 x 3584): 4 rows on one warp 1917 GB/s, against 1515 GB/s at (16, 4) (same
# work a thread, 72 registers, no spill). Taken for every Q4_K GEMV at first, it made the
# 3584-row ones slower (a later H200 call, bench_kernels.py --quick: 3584 x 18944 63.8 us
# against 25.6 at (16, 4), 3584 x 3584 11.7 against 8.5; unsplit 1-warp programs, see
# WARPS_PER_CORE), so it is the stack's alone until those are measured again. Q6_K's best, 32
# rows on one warp with prefetch 1 (1504 against 1174 GB/s for down, 3584 x 18944), takes 255
# registers and spills (compile_kernels.py): not taken. Other types, GPUs and M > 1 keep
# (BLOCK_N, NUM_WARPS, PREFETCH): not measured.
SM90_LAUNCH = {(T.Q4_K, True): (4, 1, PREFETCH)}
# Default K splits aim for this many warps per SM (programs of num_warps warps each), so that
# enough weight bytes are in flight to cover memory latency: a warp's loop has one 16-byte
# load a thread in flight, plus its L2 prefetches. Counted in programs before (8 a core, for
# 4-warp programs): with 1-warp Q4_K programs that left 3584-row GEMVs (the 7B's q, o and
# down) unsplit, 896 programs of one warp, ~7 warps an SM: 598 GB/s for Q4_K down (3584 x
# 18944) where the gate/up stack, 9472 programs, reached 1917 (H200, 2026-12-04,
# bench_kernels.py --quick). 32 keeps 4-warp programs where they were (8 a core;
# H200 sweep, 7B Q6_K down at 32 rows a program: the default (9 splits) 1504 GB/s, 8 splits
# 1489, 4 1146, 1 345). Partial sums cost splits * M * N * 8 bytes, ~1-2% of the weight bytes
# at these shapes. QVL_GEMV_WARPS_PER_CORE sets it (benchmarks).
WARPS_PER_CORE = int(os.environ.get("QVL_GEMV_WARPS_PER_CORE", "32"))
INTERPRETED_PROGRAMS = 4  # in the interpreter (one "core"): a few splits, each costs milliseconds


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
    return out


@triton.jit
def qgemv_kernel(
    x_ptr, w_ptr, g_ptr, y_ptr, part_ptr, count_ptr, bias_ptr, res_ptr, norm_w_ptr, normed_ptr,
    nq_ptr, nd_ptr, ns_ptr, ns16_ptr, M, N_OUT, steps, row_units, steps_per_split, splits, stride_xm, eps,
    QTYPE: tl.constexpr, STEP_BYTES: tl.constexpr, ROW_ALIGN: tl.constexpr, SPLIT: tl.constexpr,
    SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, Q8: tl.constexpr,
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
    if BLOCK_M == 1:  # per lane (qgemv_steps._rows)
        acc = lane_sums(QTYPE, BLOCK_N)
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
        acc = step(acc, x_step, stride_xm, M, rows, row, g_ptr, QTYPE, BLOCK_M, ASM)
    if BLOCK_M == 1:
        acc = row_sums(acc, QTYPE)
    finish_rows(acc, pid_n, split, splits, rows, y_ptr, part_ptr, count_ptr, bias_ptr, res_ptr, norm_w_ptr,
                normed_ptr, nq_ptr, nd_ptr, ns_ptr, ns16_ptr, M, N_OUT, eps, SPLIT, SWIGLU, HAS_BIAS, HAS_RES, NORM,
                Q8, BLOCK_M, BLOCK_N, NORM_CHUNK)


@triton.jit
def finish_rows(acc, pid_n, split, splits, rows, y_ptr, part_ptr, count_ptr, bias_ptr, res_ptr, norm_w_ptr, normed_ptr,
                nq_ptr, nd_ptr, ns_ptr, ns16_ptr, M, N_OUT, eps, SPLIT: tl.constexpr, SWIGLU: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, Q8: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM_CHUNK: tl.constexpr):
    """After a program's K range: its sums acc (BLOCK_M, BLOCK_N) to the rows' outputs (module
    doc). With SPLIT, acc goes to the partials (splits, BLOCK_M, row blocks * BLOCK_N, every
    slot written, padding rows too) and the row block's last program to arrive adds them in
    split order; the finishing program applies the epilogue (`_finish`) and, with NORM, counts
    itself in for the launch's norm (`_norm_if_last`). With Q8 the int8 form of what feeds the
    next GEMV (the norm's output, else y: `_quantize_outputs`) goes to nq_ptr ...
    (q8_activations.py). Shared with qgemv_q8.py."""
    if SPLIT:
        width = tl.num_programs(0) * BLOCK_N
        slot = part_ptr + rows[:, None] * width + (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
        tl.store(slot + split * BLOCK_M * width, acc)
        finisher = last_to_arrive(count_ptr + pid_n, splits)
        if finisher:  # add the row block's partials in split order
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(splits):
                acc += tl.load(slot + s * BLOCK_M * width, cache_modifier=".cg")  # not L1: other SMs wrote it
    else:
        finisher = True
    if finisher:
        out = _finish(acc, y_ptr, bias_ptr, res_ptr, M, N_OUT, pid_n, rows, HAS_BIAS, HAS_RES, SWIGLU, BLOCK_N)
        if NORM:
            _norm_if_last(y_ptr, norm_w_ptr, normed_ptr, nq_ptr, nd_ptr, ns_ptr, ns16_ptr,
                          count_ptr + tl.num_programs(0), M, N_OUT, eps, Q8, BLOCK_M, NORM_CHUNK)
        elif Q8:
            _quantize_outputs(out, y_ptr, nq_ptr, nd_ptr, ns_ptr, ns16_ptr, count_ptr + tl.num_programs(0) + 1, pid_n,
                              N_OUT, BLOCK_N // 2 if SWIGLU else BLOCK_N)


@triton.jit
def _quantize_outputs(out, y_ptr, q_ptr, d_ptr, s_ptr, s16_ptr, count_ptr, pid_n, N_OUT, OUTS: tl.constexpr):
    """y's int8 form (M = 1; q8_activations.store_q8) from the finishing programs' OUTS outputs
    each (out (1, OUTS), columns pid_n * OUTS ...; a power of 2). OUTS from 32: each program its
    own; fewer: the last of a 32-column block's programs to arrive (counters from
    count_ptr, one a block) reads the block back and quantizes it."""
    if OUTS >= 32:
        store_q8(tl.reshape(out, (OUTS,)), pid_n * OUTS, N_OUT, q_ptr, d_ptr, s_ptr, s16_ptr, OUTS // 32)
    else:
        block = pid_n * OUTS // 32
        if last_to_arrive(count_ptr + block, 32 // OUTS):
            offs = block * 32 + tl.arange(0, 32)
            y = tl.load(y_ptr + offs, cache_modifier=".cg")  # not L1: other SMs wrote it
            store_q8(y, block * 32, N_OUT, q_ptr, d_ptr, s_ptr, s16_ptr, 1)


@triton.jit
def _norm_if_last(y_ptr, w_ptr, normed_ptr, q_ptr, d_ptr, s_ptr, s16_ptr, count_ptr, M, N_OUT, eps, Q8: tl.constexpr,
                  BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """The last row block to finish (of the launch's) writes RMSNorm(y) for every row of y (Q8,
    M = 1: and its int8 form)."""
    if last_to_arrive(count_ptr, tl.num_programs(0)):
        for i in tl.static_range(BLOCK_M):
            if i < M:
                norm_row(y_ptr + i * N_OUT, y_ptr, w_ptr, normed_ptr + i * N_OUT, y_ptr, N_OUT, eps, False, CHUNK,
                         ".cg", q_ptr, d_ptr, s_ptr, s16_ptr, Q8)


def qgemv(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, k: int, bias: torch.Tensor | None = None,
          residual: torch.Tensor | None = None, swiglu: bool = False, block_n: int | None = None,
          split_k: int | None = None, num_warps: int | None = None, norm_weight: torch.Tensor | None = None,
          norm_eps: float = 0.0, prefetch: int | None = None,
          q8_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (M <= 8, K) float, raw (N, K's bytes; rows raw.stride(0) apart) uint8 -> float32 `y = x @ dequant(raw).T + bias +
    residual` (M, N); with `swiglu` the N rows are [gate; up] and y is
    `silu(x @ gate.T) * (x @ up.T)` (M, N / 2). Returns (y, RMSNorm(y) * norm_weight with
    `norm_eps`, or None without a norm_weight). Checks are the caller's (qmatmul.qmatmul).

    `split_k` K-ranges (default: ~WARPS_PER_CORE warps per GPU core, at most one range per step)
    of `block_n` rows with `num_warps`, each prefetching into L2 the step `prefetch` steps ahead
    (defaults: `gemv_launch`; no prefetch where inline PTX cannot run: Triton's interpreter,
    ROCm)."""
    blk, size = GGML_QUANT_SIZES[qtype]
    m = x.shape[0]
    gpu = target(x.device)
    default_n, default_warps, default_prefetch = gemv_launch(gpu, qtype, m, swiglu)
    block_n, num_warps = block_n or default_n, num_warps or default_warps
    steps = k // STEP
    row_bytes = raw.stride(0)
    align = math.gcd(row_bytes, 16)
    n_out = n // 2 if swiglu else n
    n_blocks = triton.cdiv(n_out, block_n // 2 if swiglu else block_n)
    per, splits = k_splits(gpu, steps, n_blocks, num_warps, split_k)
    block_m = max(1, triton.next_power_of_2(m))
    out = Outputs.make(x, block_m, n_out, n_blocks, block_n, splits, bias, residual, norm_weight, q8_out)
    qgemv_kernel[(n_blocks, splits)](
        x, raw, type_grid(qtype, raw.device, raw), *out.args(), m, n_out,
        steps, row_bytes // align, per, splits, x.stride(0), norm_eps, QTYPE=QTYPE_IDS[qtype],
        STEP_BYTES=STEP // blk * size, ROW_ALIGN=align, SPLIT=splits > 1, SWIGLU=swiglu,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=out.normed is not None,
        Q8=out.q8 is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, NORM_CHUNK=min(NORM_CHUNK, triton.next_power_of_2(n_out)), ASM=gpu.ptx,
        PREFETCH=0 if not gpu.ptx else default_prefetch if prefetch is None else prefetch,
        PREFETCH_CHUNKS=triton.next_power_of_2(triton.cdiv(STEP // blk * size, 32) + 1),
        num_warps=num_warps)
    return out.y, out.normed


@dataclass(frozen=True)
class Outputs:
    """A decode GEMV launch's output side (`finish_rows`): y, the split partials and counters,
    the epilogue's operands (x itself stands for absent ones: a pointer never read)."""

    y: torch.Tensor
    parts: torch.Tensor
    count: torch.Tensor
    bias: torch.Tensor
    residual: torch.Tensor
    norm_weight: torch.Tensor
    normed: torch.Tensor | None
    q8: Q8Activations | None  # the int8 form of normed (or of y, without a norm)

    @staticmethod
    def make(x: torch.Tensor, block_m: int, n_out: int, n_blocks: int, block_n: int, splits: int,
             bias: torch.Tensor | None, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
             q8_out: bool = False) -> Outputs:
        """For x's M rows (block_m with padding), n_out outputs, `n_blocks` row blocks of
        `block_n` weight rows (a power of 2), `splits` K ranges. `q8_out` (M = 1, n_out a
        multiple of 32): the int8 form of the norm's output, or of y, made by the launch too and
        remembered as that tensor's (q8_activations.py)."""
        y = torch.empty(x.shape[0], n_out, dtype=torch.float32, device=x.device)
        parts = torch.empty(splits, block_m, n_blocks * block_n, dtype=torch.float32, device=x.device) \
            if splits > 1 else y
        norm = norm_weight is not None
        normed = torch.empty_like(y) if norm else None
        q8 = form_for(normed if normed is not None else y, q8_out and x.shape[0] == 1 and n_out % 32 == 0)
        # counters: the row blocks', the launch's (the norm), then one a 32-column block of y (its int8 form)
        wanted = n_blocks + 1 + (n_out // 32 if q8 is not None and not norm else 0)
        count = counters(x.device, wanted) if splits > 1 or norm or q8 is not None else y
        return Outputs(y, parts, count, bias.float().contiguous() if bias is not None else x,
                       residual.float().contiguous() if residual is not None else x,
                       norm_weight.float().contiguous() if norm else x, normed, q8)

    def args(self) -> tuple[torch.Tensor, ...]:
        """y_ptr, part_ptr, count_ptr, bias_ptr, res_ptr, norm_w_ptr, normed_ptr, nq_ptr, nd_ptr,
        ns_ptr, ns16_ptr."""
        return (self.y, self.parts, self.count, self.bias, self.residual, self.norm_weight,
                self.normed if self.normed is not None else self.y, *pointers(self.q8, self.y))


def k_splits(gpu: Target, steps: int, n_blocks: int, num_warps: int, split_k: int | None) -> tuple[int, int]:
    """(K steps a split, splits) for `n_blocks` row blocks of `num_warps` warps over `steps`
    K steps: `split_k` ranges, or by default ~WARPS_PER_CORE warps a GPU core (at most one
    range a step); the last range may be shorter, none empty."""
    if split_k is None:
        programs = INTERPRETED_PROGRAMS if gpu == INTERPRETER else WARPS_PER_CORE * gpu.cores // num_warps
        split_k = max(1, min(steps, programs // n_blocks))
    per = triton.cdiv(steps, split_k)
    return per, triton.cdiv(steps, per)


def gemv_launch(gpu: Target, qtype: T, m: int, swiglu: bool = False) -> tuple[int, int, int]:
    """Default (block_n, num_warps, prefetch) of a GEMV of `qtype` weights by `m` rows of x on
    `gpu` (`swiglu`: of a stacked [gate; up])."""
    if gpu == INTERPRETER:
        return INTERPRETED_BLOCK_N, NUM_WARPS, 0
    if gpu.hopper and m == 1 and (qtype, swiglu) in SM90_LAUNCH:
        return SM90_LAUNCH[qtype, swiglu]
    return BLOCK_N, NUM_WARPS, PREFETCH
