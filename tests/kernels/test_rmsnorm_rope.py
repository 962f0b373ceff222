"""RMSNorm and rotary kernels against their torch references (interpreted on the CPU).

Tolerance table:
| kernel | dtype | atol | why |
| rmsnorm | float32 | 1e-5 x max|y| | the mean of squares is summed in another order |
| rope | float32 | 2e-5 | cos/sin of the kernel's math library vs torch's, angles up to ~1e3 rad |
| rmsnorm | bf16 in, bf16 out | 1 bf16 ulp of y (2^-7 x |y|) + 1e-5 x max|y| | the float32 y rounded once to bf16: Triton's interpreter truncates (a GPU rounds to nearest, half that) |
| rope | bf16 | 1 bf16 ulp (2^-7 x |x'|) + 2e-5 x max | rotated in float32 from the bf16 values, rounded once (truncated when interpreted) |
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import pytest
import torch
from interpret import ACCEL

from qvl.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from qvl.kernels.rope import apply_rope_, merge_unit_positions, mrope_angles, vision_angles
from qvl.runtime.decoder import apply_rope, mrope_cos_sin
from qvl.runtime.vision import vision_rope


@pytest.mark.parametrize("rows,n", [(1, 64), (3, 80), (131, 120), (2, 1280), (5, 3584)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(rows, n, with_residual):
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, n, generator=g) * 3
    res = torch.randn(rows, n, generator=g) if with_residual else None
    w = 1 + 0.1 * torch.randn(n, generator=g)
    y, h = (t.cpu() for t in rmsnorm(x.to(ACCEL), w.to(ACCEL), 1e-6, res.to(ACCEL) if res is not None else None))
    y_ref, h_ref = rmsnorm_ref(x, w, 1e-6, res)
    assert (y - y_ref).abs().max().item() <= 1e-5 * y_ref.abs().max().item()
    assert torch.equal(h, h_ref)


@pytest.mark.parametrize("tokens,heads,hd,sections", [(1, 4, 16, (2, 3, 3)), (131, 2, 128, (16, 24, 24)),
                                                      (7, 7, 64, (8, 12, 12))])
def test_mrope(tokens, heads, hd, sections):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, heads, hd, generator=g)
    pos = torch.stack([torch.arange(tokens) * 2, torch.arange(tokens) % 5 + 3, torch.arange(tokens) % 7 + 3])
    cos, sin = mrope_cos_sin(pos, hd, 1e6, sections)
    ref = apply_rope(x.transpose(0, 1), cos, sin).transpose(0, 1)
    out = apply_rope_(x.to(ACCEL), mrope_angles(pos, hd, 1e6, sections).to(ACCEL)).cpu()
    assert (out - ref).abs().max().item() <= 2e-5


@pytest.mark.parametrize("tokens,heads,kv_heads", [(1, 7, 1), (5, 4, 2)])
def test_mrope_q_and_k_in_one_launch(tokens, heads, kv_heads):
    """q and k as the stacked q/k/v projection leaves them: strided views of one (tokens, 3 parts)
    buffer, rotated in place together; v, between them in memory, untouched."""
    hd, sections = 32, (4, 6, 6)
    g = torch.Generator().manual_seed(heads)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * hd, generator=g).to(ACCEL)
    before = qkv.clone()
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    pos = torch.stack([torch.arange(tokens) + 4, torch.arange(tokens) % 3, torch.arange(tokens) % 2])
    cos, sin = mrope_cos_sin(pos, hd, 1e6, sections)
    apply_rope_(q.view(tokens, heads, hd), mrope_angles(pos, hd, 1e6, sections).to(ACCEL), k.view(tokens, kv_heads, hd))
    for got, ref_in, n in ((q, before[:, :heads * hd], heads), (k, before[:, heads * hd:(heads + kv_heads) * hd],
                                                                 kv_heads)):
        ref = apply_rope(ref_in.cpu().reshape(tokens, n, hd).transpose(0, 1), cos, sin).transpose(0, 1)
        assert (got.cpu().reshape(tokens, n, hd) - ref).abs().max().item() <= 2e-5
    assert torch.equal(v, before[:, (heads + kv_heads) * hd:])


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 2, 2), (2, 6, 4)])
def test_vision_rope_head_dim_80(grid):
    hd, heads = 80, 3
    cos, sin = vision_rope([grid], hd)
    n = cos.shape[0]
    x = torch.randn(n, heads, hd, generator=torch.Generator().manual_seed(n))
    ref = x * cos[:, None] + torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), -1) * sin[:, None]
    out = apply_rope_(x.to(ACCEL), vision_angles(*merge_unit_positions([grid]), hd).to(ACCEL)).cpu()
    assert (out - ref).abs().max().item() <= 2e-5


@pytest.mark.parametrize("rows,n", [(1, 80), (131, 1280)])
def test_rmsnorm_bf16_delta_and_output(rows, n):
    """The vision tower's fused add: a bf16 product added to the float32 residual stream, the
    normed output in bf16 for the next GEMM. h is the float32 sum of the bf16 values exactly."""
    g = torch.Generator().manual_seed(rows + n)
    x = (torch.randn(rows, n, generator=g) * 3).bfloat16()
    res = torch.randn(rows, n, generator=g)
    w = 1 + 0.1 * torch.randn(n, generator=g)
    y, h = rmsnorm(x.to(ACCEL), w.to(ACCEL), 1e-6, res.to(ACCEL), out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, h_ref = rmsnorm_ref(x, w, 1e-6, res)
    assert torch.equal(h.cpu(), h_ref)
    err = (y.cpu().float() - y_ref).abs()
    assert (err <= 2 ** -7 * y_ref.abs() + 1e-5 * y_ref.abs().max()).all()


@pytest.mark.parametrize("tokens", [1, 17, 131])
def test_rope_bf16_views_of_one_product(tokens):
    """q and k as the vision tower has them on the GPU: bf16 views (token stride 3 x 80 x heads)
    into one q/k/v product, rotated where they are in one launch; v untouched. Tokens not a
    multiple of the kernel's token block."""
    hd, heads = 80, 3
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, 3 * heads * hd, generator=g).bfloat16()
    before = qkv.clone()
    rows = torch.arange(tokens) % 5
    theta = vision_angles(rows, torch.arange(tokens) // 5, hd)
    dev = qkv.to(ACCEL)
    q, k, v = (t.view(tokens, heads, hd) for t in dev.split(heads * hd, dim=-1))
    apply_rope_(q, theta.to(ACCEL), k)
    cos, sin = torch.cat([theta, theta], -1).cos()[:, None], torch.cat([theta, theta], -1).sin()[:, None]
    for got, part in ((q, 0), (k, 1)):
        x = before[:, part * heads * hd:(part + 1) * heads * hd].view(tokens, heads, hd).float()
        ref = x * cos + torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), -1) * sin
        err = (got.cpu().float() - ref).abs()
        assert (err <= 2 ** -7 * ref.abs() + 2e-5 * ref.abs().max()).all()
    assert torch.equal(v.cpu(), before[:, 2 * heads * hd:].view(tokens, heads, hd))
