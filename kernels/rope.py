"""Rotary embedding applied to q or k in place, for M-RoPE (text) and the 2-D vision rotary.

Both are the rotate-half form `x' = x * cos + rotate_half(x) * sin` with per-token angles; they
differ only in where the angles come from, so the kernel takes a per-token table of half-angles
`theta (tokens, head_dim / 2)` built by the caller (`mrope_angles`, `vision_angles`, re-exported here from the runtime):
M-RoPE sections take the temporal / height / width position for their frequency pairs; the
vision rotary takes the row for the first half of the frequencies and the column for the rest.
One program per (BLOCK_T tokens, head), q's heads and k's in one launch when both are given;
head_dim need not be a power of two (80 for the vision tower). (One program a (token, head)
before: 414,720 programs for a 2530x1000 image's q and k, 250 us a layer on an H200, where
the bytes take ~35 us.)
Torch reference: qvl.runtime.decoder.apply_rope with cos/sin of the same angles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..runtime.decoder import mrope_angles  # noqa: F401  (angle tables for apply_rope_)
from ..runtime.vision import merge_unit_positions, vision_angles  # noqa: F401


@triton.jit
def rotate_half_(base, theta_ptr, half, BLOCK: tl.constexpr):
    """One head at base (2 * half float32 values) rotated in place by the half-angles at
    theta_ptr (kernels/kv_store.py's decode step: one token): each thread reads and writes the
    same pair (i, half + i), so no thread reads what another writes."""
    i = tl.arange(0, BLOCK)
    mask = i < half
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + half + i, mask=mask, other=0.0)
    ang = tl.load(theta_ptr + i, mask=mask, other=0.0)
    c = tl.cos(ang)
    s = tl.sin(ang)
    tl.store(base + i, x1 * c - x2 * s, mask=mask)
    tl.store(base + half + i, x2 * c + x1 * s, mask=mask)


BLOCK_T = 16  # tokens a program rotates (of one head): 16 x 64 values for head dim 80 or 128


@triton.jit
def rope_kernel(
    # pointers
    x_ptr, y_ptr, theta_ptr,
    # dimensions: heads of x; heads from n_heads on are y's
    tokens, n_heads, half,
    # strides
    sx_tok, sx_head, sy_tok, sy_head, stride_theta,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (token block, head): BLOCK_T tokens of one head rotated in place. Each thread
    reads and writes the same pairs (i, half + i), so no thread reads what another writes; the
    values are rotated in float32 and stored in x's (y's) own type."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK)[None, :]
    mask = (tok < tokens) & (i < half)
    if head < n_heads:
        base = x_ptr + tok.to(tl.int64) * sx_tok + head * sx_head
    else:
        base = y_ptr + tok.to(tl.int64) * sy_tok + (head - n_heads) * sy_head
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + half + i, mask=mask, other=0.0)
    ang = tl.load(theta_ptr + tok * stride_theta + i, mask=mask, other=0.0)
    c = tl.cos(ang)
    s = tl.sin(ang)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(base + i, (a * c - b * s).to(x1.dtype), mask=mask)
    tl.store(base + half + i, (b * c + a * s).to(x1.dtype), mask=mask)


def apply_rope_(x: torch.Tensor, theta: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x (tokens, heads, head_dim) float32, bfloat16 or float16, rotated in place by theta
    (tokens, head_dim / 2); y (tokens, heads_y, head_dim) of x's type, if given, too, in the
    same launch (q and k of a layer). Views with a contiguous last dimension (q, k and v cut
    from one product) are rotated where they are."""
    tokens, heads, hd = x.shape
    assert x.stride(-1) == 1 and theta.shape == (tokens, hd // 2)
    other = x if y is None else y
    assert other.shape[0] == tokens and other.shape[2] == hd and other.stride(-1) == 1 and other.dtype == x.dtype
    theta = theta.contiguous().float()
    rope_kernel[(triton.cdiv(tokens, BLOCK_T), heads + (0 if y is None else y.shape[1]))](
        x, other, theta, tokens, heads, hd // 2, x.stride(0), x.stride(1), other.stride(0), other.stride(1),
        theta.stride(0), BLOCK_T=BLOCK_T, BLOCK=triton.next_power_of_2(hd // 2))
    return x
