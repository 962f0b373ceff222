"""Store one decode token's keys and values into the KV cache at a slot read from the device.

A decode step writes k and v (kv_heads, 1, head_dim) float32 into the cache's (kv_heads,
capacity, head_dim) buffers at the slot `index` (a device tensor, so a CUDA graph can hold the
step): in torch that is a conversion and an index_copy_ for each, four launches a layer (a
q8_0 cache: about sixteen, quantizing); here one, program (kv head, k or v), converting to the
cache's type as it stores: float32, bf16, float16 rounded to nearest even as torch's `.to`, or
q8_0 exactly as the runtime's torch quantizer (decoder.quantize_q8): per block of the head dimension
d = amax|x| / 127, q = round-half-even(x / d) as int8, d stored as float16.

Given the token's rotary angles and its q, the same launch applies the rotary first (rope.py's
rotate-half form): k rotated as it is stored, q rotated in place by programs of its own (kv
head h, part 2 + j: query head h * group + j), so a decode layer's rotary costs no launch.
Torch references: `kv_store_ref` (index_copy_), `kv_store_q8_ref` (the runtime's quantize_q8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope import rotate_half_


@triton.jit
def _to_cache_type(x, ptr):
    """float32 x as ptr's element type, rounded to nearest even. For bf16 by hand: Triton 3.9's
    interpreter truncates float32 -> bf16 conversions (a GPU rounds), and the hand-made rounding
    gives the same bits on both."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _rotated(x, head_ptr, offs, mask, theta_ptr, head_dim):
    """x (elements `offs` of the head at head_ptr) after the rotary: x * cos - partner * sin in
    the first half, x * cos + partner * sin in the second, as rope_kernel computes them."""
    half = head_dim // 2
    partner = tl.load(head_ptr + (offs + half) % head_dim, mask=mask, other=0.0)
    ang = tl.load(theta_ptr + offs % half, mask=mask, other=0.0)
    c = tl.cos(ang)
    s = tl.sin(ang)
    return tl.where(offs < half, x * c - partner * s, x * c + partner * s)


@triton.jit
def kv_store_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, index_ptr, q_ptr, theta_ptr, head_dim, group, sk_h, sv_h, sq_h,
                    sc_h, sc_t, ROTATE: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    part = tl.program_id(1)
    slot = tl.load(index_ptr)
    d = tl.arange(0, BLOCK_D)
    mask = d < head_dim
    if part == 0:
        x = tl.load(k_ptr + head * sk_h + d, mask=mask)
        if ROTATE:
            x = _rotated(x, k_ptr + head * sk_h, d, mask, theta_ptr, head_dim)
        tl.store(kc_ptr + head * sc_h + slot * sc_t + d, _to_cache_type(x, kc_ptr), mask=mask)
    elif part == 1:
        x = tl.load(v_ptr + head * sv_h + d, mask=mask)
        tl.store(vc_ptr + head * sc_h + slot * sc_t + d, _to_cache_type(x, vc_ptr), mask=mask)
    else:
        rotate_half_(q_ptr + (head * group + part - 2) * sq_h, theta_ptr, head_dim // 2, BLOCK_D // 2)


@triton.jit
def kv_store_q8_kernel(k_ptr, v_ptr, kq_ptr, vq_ptr, kd_ptr, vd_ptr, index_ptr, query_ptr, theta_ptr, group,
                       sk_h, sv_h, squery_h, sq_h, sq_t, sd_h, sd_t, ROTATE: tl.constexpr, Q8_BLOCK: tl.constexpr,
                       N_BLOCKS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    part = tl.program_id(1)
    if part >= 2:
        rotate_half_(query_ptr + (head * group + part - 2) * squery_h, theta_ptr, N_BLOCKS * Q8_BLOCK // 2,
                     BLOCK_D // 2)
    else:
        _store_q8(k_ptr, v_ptr, kq_ptr, vq_ptr, kd_ptr, vd_ptr, index_ptr, theta_ptr, sk_h, sv_h, sq_h, sq_t, sd_h,
                  sd_t, head, part, ROTATE, Q8_BLOCK, N_BLOCKS, BLOCK_B, BLOCK_E)


@triton.jit
def _store_q8(k_ptr, v_ptr, kq_ptr, vq_ptr, kd_ptr, vd_ptr, index_ptr, theta_ptr, sk_h, sv_h, sq_h, sq_t, sd_h, sd_t,
              head, part, ROTATE: tl.constexpr, Q8_BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """Head `head`'s k (part 0, rotated with ROTATE) or v (part 1) quantized into the cache."""
    slot = tl.load(index_ptr)
    b = tl.arange(0, BLOCK_B)[:, None]  # block of the head dimension
    e = tl.arange(0, BLOCK_E)[None, :]  # element within the block
    mask = (b < N_BLOCKS) & (e < Q8_BLOCK)
    offs = b * Q8_BLOCK + e
    if part == 0:
        x = tl.load(k_ptr + head * sk_h + offs, mask=mask, other=0.0)
        if ROTATE:
            x = _rotated(x, k_ptr + head * sk_h, offs, mask, theta_ptr, N_BLOCKS * Q8_BLOCK)
        q_ptr, d_ptr = kq_ptr, kd_ptr
    else:
        x = tl.load(v_ptr + head * sv_h + offs, mask=mask, other=0.0)
        q_ptr, d_ptr = vq_ptr, vd_ptr
    d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)  # IEEE division, as torch's
    y = tl.math.div_rn(x, tl.maximum(d, 1e-30)[:, None])
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: float32 addition rounds y half to even, as torch.round
    q = tl.where(d[:, None] > 0, y, 0.0)
    tl.store(q_ptr + head * sq_h + slot * sq_t + offs, q.to(tl.int8), mask=mask)
    tl.store(d_ptr + head * sd_h + slot * sd_t + tl.arange(0, BLOCK_B), d.to(tl.float16),
             mask=tl.arange(0, BLOCK_B) < N_BLOCKS)


def kv_store_q8(k: torch.Tensor, v: torch.Tensor, k_values: torch.Tensor, v_values: torch.Tensor,
                k_scales: torch.Tensor, v_scales: torch.Tensor, index: torch.Tensor, q: torch.Tensor | None = None,
                theta: torch.Tensor | None = None) -> None:
    """k, v (kv_heads, 1, head_dim) float32 (any head stride) -> a q8_0 cache at slot index[0]:
    int8 values (kv_heads, capacity, head_dim) and float16 scales (kv_heads, capacity, blocks).
    With the token's rotary angles `theta` (head_dim / 2) and its q (heads, 1, head_dim): k
    rotated before it is stored, q rotated in place."""
    heads, _, d = k_values.shape
    blocks = k_scales.shape[-1]
    assert k.shape == v.shape == (heads, 1, d) and k.stride(-1) == v.stride(-1) == 1 and d % blocks == 0
    assert k_values.stride() == v_values.stride() and k_values.stride(-1) == 1 and k_values.dtype == torch.int8
    assert k_scales.stride() == v_scales.stride() and k_scales.stride(-1) == 1 and k_scales.dtype == torch.float16
    q, theta, group = _rotation(q, theta, k, heads, d)
    kv_store_q8_kernel[(heads, 2 + group)](
        k, v, k_values, v_values, k_scales, v_scales, index, q, theta, group, k.stride(0), v.stride(0), q.stride(0),
        k_values.stride(0), k_values.stride(1), k_scales.stride(0), k_scales.stride(1), ROTATE=group > 0,
        Q8_BLOCK=d // blocks, N_BLOCKS=blocks, BLOCK_B=triton.next_power_of_2(blocks),
        BLOCK_E=triton.next_power_of_2(d // blocks), BLOCK_D=triton.next_power_of_2(d))


def _rotation(q: torch.Tensor | None, theta: torch.Tensor | None, k: torch.Tensor, kv_heads: int,
              d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(q, theta, query heads per KV head) for the launch; group 0 (and k for both) without a rotation."""
    if q is None or theta is None:
        assert q is None and theta is None, "q and theta go together"
        return k, k, 0
    assert q.shape[0] % kv_heads == 0 and q.shape[-1] == d and q.numel() == q.shape[0] * d and q.stride(-1) == 1
    assert theta.numel() == d // 2 and theta.dtype == torch.float32 and theta.is_contiguous()
    return q, theta, q.shape[0] // kv_heads


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             index: torch.Tensor, q: torch.Tensor | None = None, theta: torch.Tensor | None = None) -> None:
    """k, v (kv_heads, 1, head_dim) float32 (any head stride) -> k_cache / v_cache
    (kv_heads, capacity, head_dim), float, at slot index[0] (an integer tensor on their device).
    With the token's rotary angles `theta` (head_dim / 2) and its q (heads, 1, head_dim): k
    rotated before it is stored, q rotated in place."""
    heads, _, d = k_cache.shape
    assert k.shape == v.shape == (heads, 1, d) and k.stride(-1) == v.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and k_cache.dtype == v_cache.dtype
    q, theta, group = _rotation(q, theta, k, heads, d)
    kv_store_kernel[(heads, 2 + group)](k, v, k_cache, v_cache, index, q, theta, d, group, k.stride(0), v.stride(0),
                                        q.stride(0), k_cache.stride(0), k_cache.stride(1), ROTATE=group > 0,
                                        BLOCK_D=triton.next_power_of_2(d))


def kv_store_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 index: torch.Tensor) -> None:
    k_cache.index_copy_(1, index, k.to(k_cache.dtype))
    v_cache.index_copy_(1, index, v.to(v_cache.dtype))


def kv_store_q8_ref(k: torch.Tensor, v: torch.Tensor, k_values: torch.Tensor, v_values: torch.Tensor,
                    k_scales: torch.Tensor, v_scales: torch.Tensor, index: torch.Tensor) -> None:
    from ..runtime.decoder import quantize_q8

    block = k_values.shape[-1] // k_scales.shape[-1]
    for x, values, scales in ((k, k_values, k_scales), (v, v_values, v_scales)):
        q, d = quantize_q8(x, block)
        values.index_copy_(1, index, q.flatten(-2))
        scales.index_copy_(1, index, d[..., 0])
