"""Fused residual add + RMSNorm: `h = x + residual; y = weight * h / sqrt(mean(h^2) + eps)`.

One program per row, in chunks of CHUNK columns (`norm_row`): a first pass sums h^2 in float32
(and stores h), a second normalizes. The same `norm_row` runs at the end of a decode GEMV whose
output feeds a norm (qgemv.py: the last program normalizes the finished rows, so the norm costs
no launch of its own); chunks keep its registers off the GEMV's loop. Returns (y, h) so the
caller keeps the new residual. Torch reference: `rmsnorm_ref` (qvl.runtime.decoder.rms_norm
after the add).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import q8_activations
from .q8_activations import form_for, pointers, store_q8

CHUNK = 1024  # columns per pass step: 8 float32 registers a thread at 4 warps


@triton.jit
def _chunk(x_ptr, res_ptr, c0, n_cols, HAS_RESIDUAL: tl.constexpr, CHUNK: tl.constexpr, CACHE: tl.constexpr):
    """Columns c0 .. c0 + CHUNK of h = x (+ res), float32, with their indices and mask."""
    cols = c0 + tl.arange(0, CHUNK)
    mask = cols < n_cols
    h = tl.load(x_ptr + cols, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return h, cols, mask


@triton.jit
def norm_row(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, n_cols, eps, HAS_RESIDUAL: tl.constexpr, CHUNK: tl.constexpr,
             CACHE: tl.constexpr, q_ptr=None, d_ptr=None, s_ptr=None, s16_ptr=None, Q8: tl.constexpr = False):
    """One row: y = w * h * rsqrt(mean(h^2) + eps) with h = x (+ res, then stored at h_ptr).
    CACHE: the load cache modifier for x ("" or ".cg" where another SM just wrote it). With Q8
    (n_cols a multiple of 32), y's int8 form for the next GEMV too (q8_activations.store_q8)."""
    sq = tl.zeros((CHUNK,), dtype=tl.float32)
    for c0 in range(0, n_cols, CHUNK):
        h, cols, mask = _chunk(x_ptr, res_ptr, c0, n_cols, HAS_RESIDUAL, CHUNK, CACHE)
        if HAS_RESIDUAL:
            tl.store(h_ptr + cols, h, mask=mask)
        sq += h * h
    scale = tl.rsqrt(tl.sum(sq, axis=0) / n_cols + eps)
    for c0 in range(0, n_cols, CHUNK):  # h again from x (+ res): another thread may have stored it
        h, cols, mask = _chunk(x_ptr, res_ptr, c0, n_cols, HAS_RESIDUAL, CHUNK, CACHE)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = w * (h * scale)
        tl.store(y_ptr + cols, y, mask=mask)
        if Q8:
            store_q8(y, c0, n_cols, q_ptr, d_ptr, s_ptr, s16_ptr, CHUNK // 32)


@triton.jit
def rmsnorm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,
    # dimensions
    n_cols, eps,
    # strides
    stride_row,
    q_ptr, d_ptr, s_ptr, s16_ptr,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, CHUNK: tl.constexpr, Q8: tl.constexpr,
):
    at = tl.program_id(0).to(tl.int64) * stride_row
    norm_row(x_ptr + at, res_ptr + at, w_ptr, y_ptr + at, h_ptr + at, n_cols, eps, HAS_RESIDUAL, CHUNK, "", q_ptr,
             d_ptr, s_ptr, s16_ptr, Q8)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.float32, q8_out: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n) float32, bfloat16 or float16, residual (rows, n) -> (normed in `out_dtype`,
    x + residual in float32; x itself without a residual). x is read in its own type (a
    product's bf16 output: no float32 copy first), the sums are float32; a normed output that
    feeds a bf16 GEMM is stored in bf16 (no conversion pass before it). `q8_out` (default:
    q8_activations.ENABLED; one float32 row, n a multiple of 32): the normed row's int8 form
    too, remembered as its (the next int8 GEMV's x)."""
    x = x.contiguous()
    rows, n = x.shape
    y = torch.empty(rows, n, dtype=out_dtype, device=x.device)
    h = torch.empty(rows, n, dtype=torch.float32, device=x.device) if residual is not None else x
    res = residual.contiguous().float() if residual is not None else x
    if q8_out is None:
        q8_out = q8_activations.ENABLED
    q8 = form_for(y, q8_out and rows == 1 and n % 32 == 0 and out_dtype == torch.float32)
    rmsnorm_kernel[(rows,)](x, res, weight.float().contiguous(), y, h, n, eps, x.stride(0), *pointers(q8, y),
                            HAS_RESIDUAL=residual is not None, CHUNK=min(CHUNK, triton.next_power_of_2(n)),
                            Q8=q8 is not None)
    return y, h


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..runtime.decoder import rms_norm

    h = x.float() + residual.float() if residual is not None else x.float()
    return rms_norm(h, weight, eps), h
