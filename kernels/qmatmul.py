"""Dequantizing matmul straight from GGUF blocks: `y = x @ dequant(W).T`, W never materialized.

The blocked algorithm: program (pid_m, pid_n) owns a BLOCK_M x BLOCK_N tile of y. It walks K in
steps of 256 elements (one Q4_K super-block, or eight Q8_0 blocks), loads the raw bytes of the
BLOCK_N weight rows for that step, decodes them in registers into a (BLOCK_N, 256) float32 tile,
and accumulates `x_tile @ w_tile.T` in float32. Decode (M <= 8) goes to qgemv.py's split-K
GEMV instead, which regroups the same layouts so that scales apply once per sub-block.

Decoding, per element e of a 256-element step (layouts in convert/quant/):
  Q8_0: block b = e // 32 at byte 34*b: f16 d, then int8 q[e % 32];      w = d * q
  Q4_K: 144 bytes: f16 d, f16 dmin, scales[12], qs[128]; with g = e // 64, hi = (e % 64) >= 32,
        j = 2g + hi: byte = qs[32g + e % 32], q = hi ? byte >> 4 : byte & 15, and the 6-bit
        (sc, m) of sub-block j;                                            w = d*sc*q - dmin*m
  Q6_K: 210 bytes: ql[128], qh[64], int8 scales[16], f16 d; h = e // 128, r = e % 128,
        quarter = r // 32, l = r % 32: nibble of ql[64h + l + 32*(quarter % 2)] (low for
        quarter < 2), bits 2*quarter of qh[32h + l] on top;               w = d*scale[e//16]*(q-32)
  Q5_0: 22-byte blocks of 32: f16 d, u32 qh, qs[16]; j = e % 32: nibble of qs[j % 16] (low for
        j < 16), bit j of qh on top;                                       w = d*(q - 16)

The torch reference beside it (`qmatmul_ref`) dequantizes with gguf-py and multiplies in float32.
Launch parameters are the caller's (`qmatmul`); the CI runs these kernels under
TRITON_INTERPRET=1 on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from .dot import dot, interpreted
from .target import INTERPRETER, Target, target
from .qgemv import STEP, f16_at, q4_k_scale_min, qgemv


@triton.jit
def _decode_q8_0(row_ptr, e):
    """row_ptr: (BLOCK_N, 1) pointers to the step's first block; e: (1, 256) element indices."""
    blk = row_ptr + (e // 32) * 34
    d = f16_at(blk)
    q = tl.load(blk + 2 + e % 32).to(tl.int8, bitcast=True).to(tl.float32)
    return d * q


@triton.jit
def _decode_q4_k(row_ptr, e):
    d = f16_at(row_ptr + 0 * e)
    dmin = f16_at(row_ptr + 2 + 0 * e)
    g = e // 64
    hi = (e % 64) >= 32
    sc, m = q4_k_scale_min(row_ptr + 4, 2 * g + hi.to(tl.int32))
    byte = tl.load(row_ptr + 16 + 32 * g + e % 32).to(tl.int32)
    q = tl.where(hi, byte >> 4, byte & 15)
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
def _decode_q5_0(row_ptr, e):
    blk = row_ptr + (e // 32) * 22
    j = e % 32
    d = f16_at(blk)
    byte = tl.load(blk + 6 + j % 16).to(tl.int32)
    nib = tl.where(j < 16, byte & 15, byte >> 4)
    qh = tl.load(blk + 2 + j // 8).to(tl.int32)  # little-endian u32: bit j is bit j % 8 of byte j // 8
    q = nib | (((qh >> (j % 8)) & 1) << 4)
    return d * (q - 16).to(tl.float32)


@triton.jit
def _load_step(x_ptr, w_ptr, rm, rn_safe, e, kb, M, stride_xm, row_bytes, step_bytes,
               IS_Q4_K: tl.constexpr, IS_Q6_K: tl.constexpr, IS_Q5_0: tl.constexpr):
    """Elements e (any of 0..255) of K-step kb: the (BLOCK_M, len(e)) slice of x and the decoded
    (BLOCK_N, len(e)) weight tile."""
    x = tl.load(x_ptr + rm[:, None] * stride_xm + kb * 256 + e[None, :], mask=rm[:, None] < M, other=0.0)
    return x, decode_tile(w_ptr, rn_safe, e, kb, row_bytes, step_bytes, IS_Q4_K, IS_Q6_K, IS_Q5_0)


@triton.jit
def decode_tile(w_ptr, rn_safe, e, kb, row_bytes, step_bytes,
                IS_Q4_K: tl.constexpr, IS_Q6_K: tl.constexpr, IS_Q5_0: tl.constexpr):
    """Elements e (any of 0..255) of K-step kb of weight rows rn_safe, decoded: (len(rn_safe), len(e)) float32."""
    row_ptr = w_ptr + rn_safe[:, None].to(tl.int64) * row_bytes + kb * step_bytes
    if IS_Q4_K:
        w = _decode_q4_k(row_ptr, e[None, :])
    elif IS_Q6_K:
        w = _decode_q6_k(row_ptr, e[None, :])
    elif IS_Q5_0:
        w = _decode_q5_0(row_ptr, e[None, :])
    else:
        w = _decode_q8_0(row_ptr, e[None, :])
    return w


@triton.jit
def qmatmul_kernel(
    # pointers
    x_ptr, w_ptr, y_ptr,
    # dimensions
    M, N, K, row_bytes, step_bytes,
    # strides
    stride_xm, stride_ym,
    # meta-parameters
    IS_Q4_K: tl.constexpr, IS_Q6_K: tl.constexpr, IS_Q5_0: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (pid_m, pid_n): the (BLOCK_M, BLOCK_N) tile of y, BLOCK_K (64, 128 or 256)
    elements of K a time, so that a quarter of a super-block is decoded at once, not all of it."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_safe = tl.where(rn < N, rn, 0)  # masked rows decode row 0 and are never stored
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, K // BLOCK_K):
        kb = c // (256 // BLOCK_K)  # chunk c of K: part c % (256 // BLOCK_K) of super-block kb
        e = (c % (256 // BLOCK_K)) * BLOCK_K + tl.arange(0, BLOCK_K)
        x, w = _load_step(x_ptr, w_ptr, rm, rn_safe, e, kb, M, stride_xm, row_bytes, step_bytes,
                          IS_Q4_K, IS_Q6_K, IS_Q5_0)
        acc += dot(x, tl.trans(w.to(x.dtype)), LOW, EMULATE)  # LOW: the decoded tile rounded to x's type
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


SUPPORTED = (T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_0)  # the Q4_K_M mix and its fallbacks
GEMV_MAX_M = 8  # rows of x up to which qmatmul takes the split-K GEMV kernel (qgemv.py)


def gemm_tiles(gpu: Target, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """GEMM launch defaults (block_m, block_n, block_k, num_warps, num_stages) for x in `dtype`.

    Not timed on a GPU yet: the largest tiles that compile for sm_75 ... sm_90 without register
    spills or too much shared memory (scripts/compile_kernels.py, docs/benchmarks.md). Tensor
    cores (bf16 / f16 on sm_80+): 128 x 128 tiles share each decoded weight among 128 rows of x,
    64 elements of K a time keep the decoded (128, 64) tile in registers. FMA products (float32
    anywhere, f16 on sm_75 where Triton emits no tensor-core code) hold the partial products in
    registers: 32 x 32 tiles, 8 warps and no software pipelining for float32 (64 x 64 spills on
    sm_80, 2 stages spill 190+ bytes a thread, 32 x 64 spills 144-392 bytes under Triton 3.6),
    16 x 32 on sm_75 (32 x 32 spills there; used
    when tiles are asked for: by default sm_75's float16 GEMMs go to dequant.py). In the
    interpreter: fewer, larger numpy operations."""
    if gpu == INTERPRETER:
        return 32, 128, 256, 4, 1
    if dtype == torch.float32:
        return 32, 32, 64, 8, 1
    if not gpu.tensor_cores:
        return 16, 32, 64, 4, 1
    return 128, 128, 64, 8, 3


def qmatmul(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, k: int, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, swiglu: bool = False, block_m: int | None = None,
            block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
            split_k: int | None = None, num_stages: int | None = None, prefetch: int | None = None) -> torch.Tensor:
    """x (M, K), raw (N, row_bytes) uint8 GGUF blocks -> `x @ dequant(raw).T + bias + residual`
    (M, N) float32; with `swiglu` the N rows are [gate; up] stacked and the result is
    `silu(x @ gate.T) * (x @ up.T)` (M, N / 2).

    x in bfloat16 / float16: the tiled GEMM multiplies on tensor cores (the decoded weights
    rounded to x's type); in float32 (or anything else, converted): exact float32 products.
    Accumulation is float32 either way; the GEMV always multiplies in float32.

    M <= GEMV_MAX_M takes qgemv.py's split-K GEMV (`split_k` K-ranges, `block_n` rows a program,
    L2 prefetches `prefetch` steps ahead; its epilogue fused), larger M the tiled GEMM (`block_m`
    x `block_n` tiles, `block_k` elements of K a time: 64, 128 or 256; the epilogue in torch
    after it). Unset launch parameters take
    `gemm_tiles`' defaults for the GPU (or the interpreter). float16 x on a GPU where Triton
    emits no tensor-core code (sm_75) and no tiles given: dequant.py's dequantize-then-cuBLAS
    instead of the tiled GEMM."""
    _check_weights(raw, qtype, n, k)
    blk, size = GGML_QUANT_SIZES[qtype]
    row_bytes = k // blk * size
    if swiglu and (n % 2 or bias is not None or residual is not None):
        raise ValueError(f"swiglu takes an even number of stacked [gate; up] rows (got {n}) and no bias or residual")
    x = _activations(x)
    m = x.shape[0]
    if m <= GEMV_MAX_M:
        return qgemv(x, raw, qtype, n, k, bias, residual, swiglu, block_n, split_k, num_warps, prefetch=prefetch)[0]
    gpu = target(x.device)
    if gpu != INTERPRETER and not gpu.tensor_cores and x.dtype == torch.float16 and block_m is None:
        from .dequant import dequant_matmul  # sm_75: cuBLAS has the tensor cores Triton does not use

        y = dequant_matmul(x, raw, qtype, n, k)
    else:
        block_m, block_n, block_k, num_warps, num_stages = (
            given or default for given, default in
            zip((block_m, block_n, block_k, num_warps, num_stages), gemm_tiles(gpu, x.dtype)))
        if block_k not in (64, 128, 256):
            raise ValueError(f"block_k = {block_k}: one of 64, 128, 256")
        y = torch.empty(m, n, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        qmatmul_kernel[grid](x, raw, y, m, n, k, row_bytes, STEP // blk * size, x.stride(0), y.stride(0),
                             IS_Q4_K=qtype == T.Q4_K, IS_Q6_K=qtype == T.Q6_K, IS_Q5_0=qtype == T.Q5_0,
                             LOW=x.dtype != torch.float32, EMULATE=interpreted(), BLOCK_M=block_m,
                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    if swiglu:
        return torch.nn.functional.silu(y[:, :n // 2]) * y[:, n // 2:]
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual
    return y


def qmatmul_norm(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, k: int, norm_weight: torch.Tensor,
                 eps: float, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, RMSNorm(y) * norm_weight) with y = `qmatmul(x, raw, ..., bias, residual)`: a
    projection onto the residual stream and the norm that reads it. M <= GEMV_MAX_M: one
    launch (the GEMV's last program normalizes, qgemv.py); larger M: the GEMM, then
    kernels/rmsnorm.py."""
    if x.shape[0] > GEMV_MAX_M:
        from .rmsnorm import rmsnorm

        y = qmatmul(x, raw, qtype, n, k, bias, residual)
        return y, rmsnorm(y, norm_weight, eps)[0]
    _check_weights(raw, qtype, n, k)
    if norm_weight.shape != (n,):
        raise ValueError(f"norm weight of shape {tuple(norm_weight.shape)} for {n} outputs")
    y, normed = qgemv(_activations(x), raw, qtype, n, k, bias, residual, norm_weight=norm_weight, norm_eps=eps)
    assert normed is not None
    return y, normed


def _activations(x: torch.Tensor) -> torch.Tensor:
    """x contiguous, in bfloat16 / float16 as given or else float32."""
    x = x.contiguous()
    return x if x.dtype in (torch.bfloat16, torch.float16) else x.float()


def _check_weights(raw: torch.Tensor, qtype: T, n: int, k: int) -> None:
    if qtype not in SUPPORTED:
        raise ValueError(f"qmatmul supports {', '.join(t.name for t in SUPPORTED)}, not {qtype.name}")
    if k % STEP:
        raise ValueError(f"K = {k} is not a multiple of {STEP}")
    blk, size = GGML_QUANT_SIZES[qtype]
    row_bytes = k // blk * size
    if raw.shape != (n, row_bytes) or raw.dtype != torch.uint8:
        raise ValueError(f"weight bytes should be uint8 ({n}, {row_bytes}), got {raw.dtype} {tuple(raw.shape)}")
    if raw.data_ptr() % 2 or raw.stride() != (row_bytes, 1):
        raise ValueError("weight bytes should be contiguous rows from an even address (float16 fields are read whole)")


def qmatmul_ref(x: torch.Tensor, raw: torch.Tensor, qtype: T) -> torch.Tensor:
    """The torch reference: gguf-py's dequantization, float32 matmul."""
    w = torch.from_numpy(np.asarray(dequantize(raw.cpu().numpy(), qtype), dtype=np.float32))
    return x.float().cpu() @ w.reshape(raw.shape[0], -1).T
