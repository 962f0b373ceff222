"""Store one decode token's keys and values into a float KV cache at a slot read from the device.

A decode step writes k and v (kv_heads, 1, head_dim) float32 into the cache's (kv_heads,
capacity, head_dim) buffers at the slot `index` (a device tensor, so a CUDA graph can hold the
step): in torch that is a conversion and an index_copy_ for each, four launches a layer; here
one, program (kv head, k or v), converting to the cache's type (float32, bf16, float16; rounded
to nearest even, as torch's `.to`) as it stores.
Torch reference: `kv_store_ref` (index_copy_).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def kv_store_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, index_ptr, head_dim, sk_h, sv_h, sc_h, sc_t,
                    BLOCK_D: tl.constexpr):
    head = tl.program_id(0)
    slot = tl.load(index_ptr)
    d = tl.arange(0, BLOCK_D)
    mask = d < head_dim
    if tl.program_id(1) == 0:
        x = tl.load(k_ptr + head * sk_h + d, mask=mask)
        tl.store(kc_ptr + head * sc_h + slot * sc_t + d, _to_cache_type(x, kc_ptr), mask=mask)
    else:
        x = tl.load(v_ptr + head * sv_h + d, mask=mask)
        tl.store(vc_ptr + head * sc_h + slot * sc_t + d, _to_cache_type(x, vc_ptr), mask=mask)


def kv_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             index: torch.Tensor) -> None:
    """k, v (kv_heads, 1, head_dim) float32 (any head stride) -> k_cache / v_cache
    (kv_heads, capacity, head_dim), float, at slot index[0] (an integer tensor on their device)."""
    heads, _, d = k_cache.shape
    assert k.shape == v.shape == (heads, 1, d) and k.stride(-1) == v.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and k_cache.dtype == v_cache.dtype
    kv_store_kernel[(heads, 2)](k, v, k_cache, v_cache, index, d, k.stride(0), v.stride(0), k_cache.stride(0),
                                k_cache.stride(1), BLOCK_D=triton.next_power_of_2(d))


def kv_store_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 index: torch.Tensor) -> None:
    k_cache.index_copy_(1, index, k.to(k_cache.dtype))
    v_cache.index_copy_(1, index, v.to(v_cache.dtype))
