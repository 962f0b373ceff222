"""Decode attention: one new query token per head against the KV cache, split over the cache
(flash-decoding), reading a float32, bf16 or q8_0 cache as stored.

Pass 1 (`decode_attention_kernel`): program (kv_head, split) takes the `group` query heads that
share one KV head (GQA) and the keys [split * keys_per_split, ...) of that head, below `length`;
it walks them BLOCK_N at a time with an online softmax in float32 (running max m, sum l,
unnormalized output acc). A q8_0 cache is int8 values with a float16 scale per block of
Q8_BLOCK values of the head dimension, multiplied in as keys and values are loaded. With one
split the program writes acc / l; with more it writes its partial (m, l, acc), and the last of
a KV head's splits to arrive (arrival.py) combines them for the head's query heads: each split
weighed by exp(m_split - max m), out = sum(w * acc) / sum(w * l), in split order; splits past
`length` have m = -inf and weigh nothing. One launch either way.

`length` is read from a device tensor, and the number of splits depends only on the cache's
capacity, so a step can be captured once in a CUDA graph and replayed as the cache grows.
Torch reference: `decode_attention_ref` (dequantize, softmax over the first `length` keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import q8_activations
from .arrival import counters, last_to_arrive
from .attention import load_kv
from .q8_activations import form_for, pointers, store_q8
from .target import INTERPRETER, Target, target

MIN_KEYS_PER_SPLIT = 256  # below this a split's fixed cost outweighs its share of the cache


def launch(gpu: Target, cache: torch.dtype) -> tuple[int, int, int]:
    """(keys per inner step, num_warps, num_stages) for a cache of `cache` values (int8: q8_0).
    Not timed on a GPU yet: compiled for sm_75 ... sm_90 (scripts/compile_kernels.py) with
    Triton 3.9 and 3.6, 32 keys and no software pipelining spill no registers and take 40 KiB
    of shared memory: 4 warps for a bf16 / f16 cache, 8 for float32 and q8_0 (with 4, Triton 3.6
    spills 40-200 bytes a thread for those on sm_86 / sm_90; 8 warps cost the bf16 cache ~12%
    more instructions a block). Triton's default 3 stages (64 keys) spilled 3.5 KB a thread on
    sm_90 for bf16 / q8_0 caches and needed 139 KiB of shared memory, more than an RTX 30xx /
    40xx has (99 KiB). In the interpreter: 64 keys, so the tests' short caches still span
    several steps and splits."""
    if gpu == INTERPRETER:
        return 64, 4, 1
    return 32, 4 if cache in (torch.bfloat16, torch.float16) else 8, 1


@triton.jit
def _store_normalized(o_ptr, heads, rd, acc, l, g_ok, mask, kv_head, group, head_dim, q_ptr, d_ptr, s_ptr, s16_ptr,
                      Q8: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc / l for the group's heads (padding rows past the group, where l = 0, divide by 1);
    with Q8 (BLOCK_D = head_dim, a multiple of 32) their int8 form for the o projection's GEMV
    too (q8_activations.py): the group's heads are one run of the output."""
    out = acc / tl.where(g_ok, l, 1.0)[:, None]
    tl.store(o_ptr + heads[:, None] * head_dim + rd[None, :], out, mask=mask)
    if Q8:
        start = kv_head * group * head_dim
        store_q8(tl.reshape(out, (BLOCK_G * BLOCK_D,)), start, start + group * head_dim, q_ptr, d_ptr, s_ptr,
                 s16_ptr, BLOCK_G * BLOCK_D // 32)


@triton.jit
def decode_attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, po_ptr, pm_ptr, pl_ptr, count_ptr, o_ptr,
    oq_ptr, od_ptr, os_ptr, os16_ptr,
    # dimensions
    head_dim, group, scale, keys_per_split, n_splits,
    # strides (head, token) of q, of the caches (k and v alike) and of their scales
    sq_h, sk_h, sk_t, ss_h, ss_t,
    # meta-parameters
    IS_Q8: tl.constexpr, Q8_BLOCK: tl.constexpr, SPLIT: tl.constexpr, OUT_Q8: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(len_ptr)
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd[None, :] < head_dim
    heads = kv_head * group + rg
    q = tl.load(q_ptr + heads[:, None] * sq_h + rd[None, :], mask=(rg[:, None] < group) & d_ok, other=0.0)
    q = q.to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, length)
    for s0 in range(start, stop, BLOCK_N):
        rn = s0 + tl.arange(0, BLOCK_N)
        kv_mask = (rn[:, None] < stop) & d_ok
        offs = kv_head * sk_h + rn[:, None] * sk_t + rd[None, :]
        s_offs = kv_head * ss_h + rn[:, None] * ss_t + rd[None, :] // Q8_BLOCK  # read only for q8_0
        k = load_kv(k_ptr, ks_ptr, offs, s_offs, kv_mask, IS_Q8).to(tl.float32)
        v = load_kv(v_ptr, vs_ptr, offs, s_offs, kv_mask, IS_Q8).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(rn[None, :] < stop, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    g_ok = rg < group
    out_mask = g_ok[:, None] & d_ok
    if SPLIT:
        row = heads * n_splits + split
        tl.store(pm_ptr + row, m_i, mask=g_ok)
        tl.store(pl_ptr + row, l_i, mask=g_ok)
        tl.store(po_ptr + row[:, None] * head_dim + rd[None, :], acc, mask=out_mask)
        if last_to_arrive(count_ptr + kv_head, n_splits):  # combine the KV head's splits, in order
            first = heads * n_splits
            m_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
            for s in range(n_splits):
                m_max = tl.maximum(m_max, tl.load(pm_ptr + first + s, mask=g_ok, other=0.0, cache_modifier=".cg"))
            l_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
            for s in range(n_splits):  # split 0 always holds key 0, so m_max is finite
                w = tl.exp(tl.load(pm_ptr + first + s, mask=g_ok, other=0.0, cache_modifier=".cg") - m_max)
                l_sum += w * tl.load(pl_ptr + first + s, mask=g_ok, other=0.0, cache_modifier=".cg")
                acc += w[:, None] * tl.load(po_ptr + (first + s)[:, None] * head_dim + rd[None, :], mask=out_mask,
                                            other=0.0, cache_modifier=".cg")
            _store_normalized(o_ptr, heads, rd, acc, l_sum, g_ok, out_mask, kv_head, group, head_dim, oq_ptr, od_ptr,
                              os_ptr, os16_ptr, OUT_Q8, BLOCK_G, BLOCK_D)
    else:
        _store_normalized(o_ptr, heads, rd, acc, l_i, g_ok, out_mask, kv_head, group, head_dim, oq_ptr, od_ptr,
                          os_ptr, os16_ptr, OUT_Q8, BLOCK_G, BLOCK_D)


def default_splits(capacity: int, kv_heads: int, gpu: Target) -> int:
    """Enough (kv_head, split) programs for ~2 per GPU core, each with at least
    MIN_KEYS_PER_SPLIT keys of the cache's capacity."""
    return max(1, min(triton.cdiv(capacity, MIN_KEYS_PER_SPLIT), triton.cdiv(2 * gpu.cores, kv_heads)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     splits: int | None = None, q8_out: bool | None = None) -> torch.Tensor:
    """q (heads, d); k, v caches (kv_heads, capacity, d), float or int8 with k_scale / v_scale
    (kv_heads, capacity, d // block) for q8_0; length: int tensor (1,) on q's device, the
    number of keys to attend to -> (heads, d) float32. `splits` defaults to
    `default_splits(capacity, ...)` (never to anything that depends on `length`). `q8_out`
    (default: q8_activations.ENABLED; d a power of 2 from 32): the output's int8 form made too,
    remembered as the output's for the o projection's int8 GEMV."""
    heads, d = q.shape
    kv_heads, capacity, _ = k.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"cache shapes {tuple(k.shape)} / {tuple(v.shape)} do not fit queries of dim {d}")
    is_q8 = k.dtype == torch.int8
    if is_q8 != (k_scale is not None and v_scale is not None):
        raise ValueError("an int8 (q8_0) cache needs k_scale and v_scale, a float cache none")
    assert k.stride() == v.stride() and k.stride(-1) == 1 and q.stride(-1) == 1
    group = heads // kv_heads
    gpu = target(q.device)
    block_n, num_warps, num_stages = launch(gpu, k.dtype)
    splits = splits or default_splits(capacity, kv_heads, gpu)
    per = triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n
    splits = triton.cdiv(capacity, per)
    out = torch.empty(heads, d, dtype=torch.float32, device=q.device)
    part_o = torch.empty(heads * splits, d, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_m = torch.empty(heads * splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_l = torch.empty(heads * splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    count = counters(q.device, kv_heads) if splits > 1 else out
    block = d // k_scale.shape[-1] if k_scale is not None else d
    ks = k_scale if k_scale is not None else k
    vs = v_scale if v_scale is not None else v
    block_d = max(16, triton.next_power_of_2(d))
    if q8_out is None:
        q8_out = q8_activations.ENABLED
    q8 = form_for(out, q8_out and block_d == d and d % 32 == 0)
    decode_attention_kernel[(kv_heads, splits)](
        q, k, v, ks, vs, length, part_o, part_m, part_l, count, out, *pointers(q8, out),
        d, group, d ** -0.5, per, splits,
        q.stride(0), k.stride(0), k.stride(1), ks.stride(0), ks.stride(1),
        IS_Q8=is_q8, Q8_BLOCK=block, SPLIT=splits > 1, OUT_Q8=q8 is not None,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
        num_stages=num_stages)
    return out


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize the first `length` keys and values, softmax in float32."""
    def dense(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        x = x[:, :length].float()
        if scale is None:
            return x
        block = x.shape[-1] // scale.shape[-1]
        return (x.unflatten(-1, (-1, block)) * scale[:, :length].float()[..., None]).flatten(-2)

    keys, values = dense(k, k_scale), dense(v, v_scale)
    group = q.shape[0] // k.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    probs = torch.softmax((keys @ q.float()[:, :, None])[..., 0] * q.shape[1] ** -0.5, dim=-1)
    return (probs[:, None, :] @ values)[:, 0]
