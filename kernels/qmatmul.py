"""Dequantizing matmul straight from GGUF blocks: `y = x @ dequant(W).T`, W never materialized.

The blocked algorithm: program (pid_m, pid_n) owns a BLOCK_M x BLOCK_N tile of y. It walks K in
steps of 256 elements (one Q4_K super-block, or eight Q8_0 blocks), loads the raw bytes of the
BLOCK_N weight rows for that step, decodes them in registers into a (BLOCK_N, 256) float32 tile,
and accumulates `x_tile @ w_tile.T` in float32. Decode (M <= 8) goes to qgemv.py's split-K
GEMV instead, which regroups the same layouts so that scales apply once per sub-block.

Decoding: qblocks.py's `decode_tile` (its doc has the layouts of every type taken).

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
from triton.runtime.errors import OutOfResources

from . import q8_activations
from .dot import dot, interpreted
from .qblocks import QTYPE_IDS, STEP, SUPPORTED, decode_tile
from .qgemv import qgemv
from .qgrids import type_grid
from .target import INTERPRETER, Target, target


@triton.jit
def _load_step(x_ptr, w_ptr, g_ptr, rm, rn_safe, e, kb, M, stride_xm, row_bytes, step_bytes, QTYPE: tl.constexpr):
    """Elements e (any of 0..255) of K-step kb: the (BLOCK_M, len(e)) slice of x and the decoded
    (BLOCK_N, len(e)) weight tile."""
    x = tl.load(x_ptr + rm[:, None] * stride_xm + kb * 256 + e[None, :], mask=rm[:, None] < M, other=0.0)
    return x, decode_tile(w_ptr, g_ptr, rn_safe, e, kb, row_bytes, step_bytes, QTYPE)


@triton.jit
def qmatmul_kernel(
    # pointers
    x_ptr, w_ptr, g_ptr, y_ptr,
    # dimensions
    M, N, K, row_bytes, step_bytes,
    # strides
    stride_xm, stride_ym,
    # meta-parameters
    QTYPE: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr,
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
        x, w = _load_step(x_ptr, w_ptr, g_ptr, rm, rn_safe, e, kb, M, stride_xm, row_bytes, step_bytes, QTYPE)
        acc += dot(x, tl.trans(w.to(x.dtype)), LOW, EMULATE)  # LOW: the decoded tile rounded to x's type
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


GEMV_MAX_M = 8  # rows of x up to which qmatmul takes the split-K GEMV kernel (qgemv.py)
# The pipeline stages a GEMM launch fitted the GPU's shared memory with, where its default did not
# (key: device, weight type, x's type, tiles, warps). Older Tritons lay out the same tiles in more
# shared memory: with Triton 3.2-3.4 the IQ1_S / IQ1_M / IQ2_S GEMMs' 3 stages take 114-120 KiB on
# sm_86 and sm_120, which have 99 (compile_kernels.py; 3.9 fits them). A launch Triton refuses
# for shared memory (OutOfResources, before it runs) is tried again with a stage fewer.
_STAGES_THAT_FIT: dict[tuple, int] = {}


def gemm_tiles(gpu: Target, dtype: torch.dtype, qtype: T | None = None) -> tuple[int, int, int, int, int]:
    """GEMM launch defaults (block_m, block_n, block_k, num_warps, num_stages) for x in `dtype`
    (and weights of `qtype`, where that matters).

    The largest tiles that compile for sm_75 ... sm_90 without register
    spills or too much shared memory (scripts/compile_kernels.py, docs/benchmarks.md). Tensor
    cores (bf16 / f16 on sm_80+): 128 x 128 tiles share each decoded weight among 128 rows of x,
    64 elements of K a time keep the decoded (128, 64) tile in registers. FMA products (float32
    anywhere, f16 on sm_75 where Triton emits no tensor-core code) hold the partial products in
    registers: 32 x 32 tiles, 8 warps and no software pipelining for float32 (64 x 64 spills on
    sm_80, 2 stages spill 190+ bytes a thread, 32 x 64 spills 144-392 bytes under Triton 3.6),
    16 x 32 on sm_75 (32 x 32 spills there; used
    when tiles are asked for: by default sm_75's float16 GEMMs go to dequant.py). In the
    interpreter: fewer, larger numpy operations.

    sm_90 (H200, Triton 3.6, 2026-12-04, bench_kernels.py --sweep at M = 2048): 128 x 128 x 64
    on 4 warps was the fastest of seven tiles for the 7B's Q4_K gate/up (235 TFLOP/s, 3.6x the 8
    warps' 8.6 ms) and its Q6_K down (102 TFLOP/s, 1.26x). On 4 warps most types spill 16-240
    bytes a thread (compile_kernels.py, Triton 3.8; Q6_K 48), Q4_K (253 registers), Q8_0 and
    Q5_K none: Q4_K takes 4 warps there (`qtype`), the rest keep 8 until measured."""
    if gpu == INTERPRETER:
        return 32, 128, 256, 4, 1
    if dtype == torch.float32:
        return 32, 32, 64, 8, 1
    if not gpu.tensor_cores:
        return 16, 32, 64, 4, 1
    return 128, 128, 64, 4 if gpu.hopper and qtype == T.Q4_K else 8, 3


def qmatmul(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, k: int, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, swiglu: bool = False, block_m: int | None = None,
            block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
            split_k: int | None = None, num_stages: int | None = None, prefetch: int | None = None) -> torch.Tensor:
    """x (M, K), raw (N, K's bytes) uint8 GGUF blocks -> `x @ dequant(raw).T + bias + residual`
    (M, N) float32 (raw's rows may be further apart than K's bytes: the first K columns of a
    wider weight, as a view); with `swiglu` the N rows are [gate; up] stacked and the result is
    `silu(x @ gate.T) * (x @ up.T)` (M, N / 2).

    x in bfloat16 / float16: the tiled GEMM multiplies on tensor cores (the decoded weights
    rounded to x's type); in float32 (or anything else, converted): exact float32 products.
    Accumulation is float32 either way; the GEMV always multiplies in float32.

    M <= GEMV_MAX_M takes qgemv.py's split-K GEMV (`split_k` K-ranges, `block_n` rows a program,
    L2 prefetches `prefetch` steps ahead; its epilogue fused), larger M the tiled GEMM (`block_m`
    x `block_n` tiles, `block_k` elements of K a time: 64, 128 or 256; the epilogue in torch
    after it). Unset launch parameters take
    `gemm_tiles`' defaults for the GPU (or the interpreter). float16 x on a GPU where Triton
    emits no tensor-core code (sm_75), or bf16 / float16 x with QVL_DEQUANT_GEMM=1, and no tiles
    given: dequant.py's dequantize-then-cuBLAS instead of the tiled GEMM."""
    _check_weights(raw, qtype, n, k)
    blk, size = GGML_QUANT_SIZES[qtype]
    row_bytes = raw.stride(0)
    if swiglu and (n % 2 or bias is not None or residual is not None):
        raise ValueError(f"swiglu takes an even number of stacked [gate; up] rows (got {n}) and no bias or residual")
    x = _activations(x)
    m = x.shape[0]
    if _int8(x, qtype):
        from .qgemv_q8 import qgemv_q8

        return qgemv_q8(x, raw, qtype, n, k, bias, residual, swiglu, q8_out=swiglu)[0]  # SwiGLU's y: down's x
    if m <= GEMV_MAX_M:
        return qgemv(x, raw, qtype, n, k, bias, residual, swiglu, block_n, split_k, num_warps, prefetch=prefetch,
                     q8_out=swiglu and q8_activations.ENABLED)[0]
    gpu = target(x.device)
    from . import dequant  # sm_75 (cuBLAS has the tensor cores Triton does not use), or QVL_DEQUANT_GEMM=1

    if block_m is None and dequant.takes_dequant(gpu, x.dtype):
        y = dequant.dequant_matmul(x, raw, qtype, n, k)
    else:
        given_stages = num_stages
        block_m, block_n, block_k, num_warps, num_stages = (
            given or default for given, default in
            zip((block_m, block_n, block_k, num_warps, num_stages), gemm_tiles(gpu, x.dtype, qtype)))
        if block_k not in (64, 128, 256):
            raise ValueError(f"block_k = {block_k}: one of 64, 128, 256")
        y = torch.empty(m, n, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        key = (x.device, qtype, x.dtype, block_m, block_n, block_k, num_warps)
        stages = _STAGES_THAT_FIT.get(key, num_stages) if given_stages is None else num_stages
        while True:
            try:
                qmatmul_kernel[grid](x, raw, type_grid(qtype, raw.device, raw), y, m, n, k, row_bytes,
                                     STEP // blk * size, x.stride(0), y.stride(0), QTYPE=QTYPE_IDS[qtype],
                                     LOW=x.dtype != torch.float32, EMULATE=interpreted(), BLOCK_M=block_m,
                                     BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=stages)
                break
            except OutOfResources:
                if given_stages is not None or stages <= 1:
                    raise
                stages -= 1
                _STAGES_THAT_FIT[key] = stages
    return _epilogue(y, n, bias, residual, swiglu)


def _epilogue(y: torch.Tensor, n: int, bias: torch.Tensor | None, residual: torch.Tensor | None,
              swiglu: bool) -> torch.Tensor:
    """y (M, N) float32 of a product -> + bias + residual, or SwiGLU over its [gate; up] halves, in torch.
    SwiGLU is written over the gate half in place (a view with y's row stride, which the next
    GEMM's operand conversion makes contiguous): no (M, N / 2) buffers of its own beside y,
    whose halves a prompt's 512 tokens make 37 MiB each for the 7B."""
    if swiglu:
        return torch.nn.functional.silu(y[:, :n // 2], inplace=True).mul_(y[:, n // 2:])
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual
    return y


def _int8(x: torch.Tensor, qtype: T) -> bool:
    """Whether this product takes the int8-activation GEMV (q8_activations.ENABLED: QVL_INT8_GEMV=1,
    off by default until a GPU has timed it and its effect on logits is weighed; batch 1, its
    types)."""
    from .qgemv_q8 import TYPES

    return q8_activations.ENABLED and qtype in TYPES and x.shape[0] == 1


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
    if _int8(x, qtype):
        from .qgemv_q8 import qgemv_q8

        y, normed = qgemv_q8(_activations(x), raw, qtype, n, k, bias, residual, norm_weight=norm_weight, norm_eps=eps,
                             q8_out=True)
    else:
        # a norm feeding int8 GEMVs: its int8 form written by the same launch (q8_activations.py)
        y, normed = qgemv(_activations(x), raw, qtype, n, k, bias, residual, norm_weight=norm_weight, norm_eps=eps,
                          q8_out=q8_activations.ENABLED)
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
    if raw.stride(1) != 1 or (n > 1 and raw.stride(0) < row_bytes):
        raise ValueError("weight bytes should be rows of contiguous bytes")
    align = 4 if qtype in (T.Q4_K, T.Q5_K) else 2  # their scales are read as 32-bit words, float16 fields whole
    if raw.data_ptr() % align or raw.stride(0) % align:
        raise ValueError(f"{qtype.name} weight rows should start at addresses divisible by {align} "
                         f"(fields of {8 * align} bits are read whole)")


def qmatmul_ref(x: torch.Tensor, raw: torch.Tensor, qtype: T) -> torch.Tensor:
    """The torch reference: gguf-py's dequantization, float32 matmul."""
    w = torch.from_numpy(np.asarray(dequantize(raw.cpu().numpy(), qtype), dtype=np.float32))
    return x.float().cpu() @ w.reshape(raw.shape[0], -1).T
