"""Fused residual add + RMSNorm: `h = x + residual; y = weight * h / sqrt(mean(h^2) + eps)`.

One program per row; the row (up to BLOCK columns, a power of two >= n) is loaded once, the
mean of squares accumulated in float32. Returns (y, h) so the caller keeps the new residual.
Torch reference: `rmsnorm_ref` (qvl.runtime.decoder.rms_norm after the add).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rmsnorm_kernel(
    # pointers
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr,
    # dimensions
    n_cols, eps,
    # strides
    stride_row,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * stride_row + cols, h, mask=mask)
    mean_sq = tl.sum(h * h, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_row + cols, w * (h * tl.rsqrt(mean_sq + eps)), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (rows, n) float32 -> (normed, x + residual)."""
    x = x.contiguous().float()
    rows, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x
    res = residual.contiguous().float() if residual is not None else x
    rmsnorm_kernel[(rows,)](x, res, weight.float().contiguous(), y, h, n, eps, x.stride(0),
                            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n))
    return y, h


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..runtime.decoder import rms_norm

    h = x.float() + residual.float() if residual is not None else x.float()
    return rms_norm(h, weight, eps), h
