"""Prefill by dequantizing, then cuBLAS: on GPUs where Triton's GEMM would run on CUDA cores,
and on any GPU when asked (QVL_DEQUANT_GEMM=1).

Triton 3.9 emits no tensor-core instructions for dots on sm_75 (T4, RTX 20xx; seen in the PTX
by scripts/compile_kernels.py), so qmatmul.py's tiled GEMM runs there as FMA loops, at a
fraction of the card's float16 tensor-core rate that cuBLAS reaches. There, prefill's
`x @ dequant(W).T` (float16 x, M > 8) decodes a slab of weight rows to float16 with
`dequant_kernel` (qmatmul.py's block decoders; values rounded to nearest float16, as the tiled
GEMM rounds its decoded tile) and multiplies with cuBLAS, slab by slab so the decoded copy
stays under SLAB_ELEMENTS (32 MiB in float16 or bfloat16) whatever the matrix. Decode (M <= 8)
keeps the GEMV, which has no dot. cuBLAS accumulates in float32 and writes float32
(`torch.mm`'s out_dtype; where torch lacks it, the product in x's type, widened after).

On tensor-core GPUs the tiled GEMM reached 102-235 TFLOP/s at M = 2048 on an H200 (2026-12-04)
while cuBLAS's bf16 GEMMs ran at ~700 in the same session's vision tower; `QVL_DEQUANT_GEMM=1`
routes bf16 / float16 prefill through this file there too, so that one session can time both
(scripts/profile_prefill.py) before either becomes the default. Same rounding as the tiled
GEMM (the decoded weights to x's type), another summation order.
Torch reference: gguf-py's dequantization (`dequant_ref`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from .qblocks import QTYPE_IDS, STEP, decode_tile
from .qgrids import type_grid
from .target import INTERPRETER, Target

SLAB_ELEMENTS = 16 * 1024 * 1024
ON_TENSOR_CORES = os.environ.get("QVL_DEQUANT_GEMM", "") == "1"  # this route on sm_80 and later too
BLOCK_N = 32  # rows and elements of K per program
BLOCK_K = 64


@triton.jit
def dequant_kernel(w_ptr, g_ptr, out_ptr, N, row_bytes, step_bytes, stride_o,
                   QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, chunk c of K): the (BLOCK_N, BLOCK_K) tile, in out's type."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1)
    kb = c // (256 // BLOCK_K)
    e = (c % (256 // BLOCK_K)) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = decode_tile(w_ptr, g_ptr, tl.where(rn < N, rn, 0), e, kb, row_bytes, step_bytes, QTYPE)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * stride_o + (kb * 256 + e)[None, :], w.to(out_ptr.dtype.element_ty),
             mask=rn[:, None] < N)


def dequant(raw: torch.Tensor, qtype: T, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """raw (n, row_bytes) uint8 GGUF rows -> (n, k) `dtype` (float16 or float32)."""
    blk, size = GGML_QUANT_SIZES[qtype]
    out = torch.empty(n, k, dtype=dtype, device=raw.device)
    dequant_kernel[(triton.cdiv(n, BLOCK_N), k // BLOCK_K)](
        raw, type_grid(qtype, raw.device, raw), out, n, raw.stride(0), STEP // blk * size, out.stride(0),
        QTYPE=QTYPE_IDS[qtype], BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def takes_dequant(gpu: Target, dtype: torch.dtype) -> bool:
    """Whether a prefill GEMM of x in `dtype` (M past the GEMV's, no tiles asked) goes through
    dequant_matmul on `gpu`: float16 where Triton has no tensor cores (sm_75); bf16 / float16
    anywhere with QVL_DEQUANT_GEMM=1; never in the interpreter (tests pretend a GPU)."""
    if gpu == INTERPRETER:
        return False
    if not gpu.tensor_cores:
        return dtype == torch.float16
    return ON_TENSOR_CORES and dtype in (torch.bfloat16, torch.float16)


_out_dtype_works: bool | None = None  # whether torch.mm(..., out_dtype=float32) ran here: tried once


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of float16 / bfloat16 operands, float32: written so by cuBLAS where torch.mm takes
    out_dtype (CUDA, torch 2.8 on; tried once), else the product in the operands' type, widened."""
    global _out_dtype_works
    if a.is_cuda and _out_dtype_works is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # an older torch, or a combination it refuses
            _out_dtype_works = False
        else:
            _out_dtype_works = True
            return out
    return (a @ b).float()


def dequant_matmul(x: torch.Tensor, raw: torch.Tensor, qtype: T, n: int, k: int) -> torch.Tensor:
    """x (M, K) float16 or bfloat16 -> `x @ dequant(raw).T` (M, N) float32, a slab of weight
    rows at a time. Checks are the caller's (qmatmul.qmatmul)."""
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    rows = max(1, SLAB_ELEMENTS // k)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        y[:, r0:r1] = mm_float32(x, dequant(raw[r0:r1], qtype, r1 - r0, k, x.dtype).T)
    return y


def dequant_ref(raw: torch.Tensor, qtype: T) -> torch.Tensor:
    """gguf-py's dequantization, float32 (n, k)."""
    w = np.asarray(dequantize(raw.cpu().numpy(), qtype), dtype=np.float32)
    return torch.from_numpy(w).reshape(raw.shape[0], -1)
