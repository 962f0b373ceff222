"""Attention over variable-length segments, non-causal (vision windows) or causal (text), with GQA.

Flash-attention's blocked algorithm: a program owns BLOCK_M queries of one segment and one
query head; it walks that segment's keys BLOCK_N at a time, keeping a running max `m`, a running
sum `l` and an unnormalized output `acc` (online softmax), all float32, and writes `acc / l`.
Segments are given by cumulative lengths: `cu_q` for queries and `cu_k` for keys (equal for the
vision tower's windows; for text prefill the keys include the KV cache, and with `causal` query
i of a segment sees keys up to `k_len - q_len + i`). Query head h reads KV head h // group.
A head dim that is not a power of two (80 for the vision tower) is taken as a power of two
plus a tail (64 + 16, `head_dim_split`), each multiplied separately, instead of padded to 128:
37.5% fewer tensor-core products at d = 80. Keys and values
may be strided views (prefill reads the KV cache in place), and a q8_0 cache is read as stored:
int8 values times a float16 scale per Q8_BLOCK of the head dim, multiplied in as they load.
Torch reference: `attention_ref` (F.scaled_dot_product_attention per segment).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dot import dot, interpreted
from .target import INTERPRETER, Target, target


@triton.jit
def load_kv(ptr, s_ptr, offs, s_offs, mask, IS_Q8: tl.constexpr):
    """Keys or values as stored; q8_0: int8 times its block's float16 scale, in float32."""
    x = tl.load(ptr + offs, mask=mask, other=0)
    if IS_Q8:
        x = x.to(tl.float32) * tl.load(s_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _cols(ptr, s_ptr, rows, s_rows, rd, valid_rows, head_dim, IS_Q8: tl.constexpr, Q8_BLOCK: tl.constexpr):
    """Columns rd of a block of keys or values (rows: element offsets of its rows; s_rows: of
    their q8_0 scales)."""
    mask = valid_rows[:, None] & (rd[None, :] < head_dim)
    return load_kv(ptr, s_ptr, rows[:, None] + rd[None, :], s_rows[:, None] + rd[None, :] // Q8_BLOCK, mask, IS_Q8)


@triton.jit
def attention_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_ptr, cu_q_ptr, cu_k_ptr,
    # dimensions
    head_dim, group, scale,
    # strides (tokens, heads) of q, of k and v alike, of their q8_0 scales, of o; the last dimension is contiguous
    sq_t, sq_h, sk_t, sk_h, ss_t, ss_h, so_t, so_h,
    # meta-parameters
    CAUSAL: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr, IS_Q8: tl.constexpr, Q8_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_D: tl.constexpr,
):
    """Program (query block, head, segment). The head dim is BLOCK_D columns (a power of two)
    and, where it is not a power of two, TAIL_D more (80 = 64 + 16): products over the two
    parts summed, so no tensor-core work is spent on padding up to 128."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seg = tl.program_id(2)
    q0 = tl.load(cu_q_ptr + seg)
    q_len = tl.load(cu_q_ptr + seg + 1) - q0
    k0 = tl.load(cu_k_ptr + seg)
    k_len = tl.load(cu_k_ptr + seg + 1) - k0
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if pid_m * BLOCK_M < q_len:
        rd = tl.arange(0, BLOCK_D)
        kv_head = head // group
        q_rows = (q0 + rm)[:, None] * sq_t + head * sq_h
        q_valid = rm[:, None] < q_len
        q = tl.load(q_ptr + q_rows + rd[None, :], mask=q_valid & (rd[None, :] < head_dim), other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if TAIL_D > 0:
            rt = BLOCK_D + tl.arange(0, TAIL_D)
            q_t = tl.load(q_ptr + q_rows + rt[None, :], mask=q_valid & (rt[None, :] < head_dim), other=0.0)
            acc_t = tl.zeros((BLOCK_M, TAIL_D), dtype=tl.float32)
        hi = k_len
        if CAUSAL:  # keys after this block's last query are all masked: stop before them
            hi = tl.minimum(k_len, k_len - q_len + (pid_m + 1) * BLOCK_M)
        for start in range(0, hi, BLOCK_N):
            rn = start + tl.arange(0, BLOCK_N)
            k_rows = (k0 + rn) * sk_t + kv_head * sk_h
            s_rows = (k0 + rn) * ss_t + kv_head * ss_h
            k = _cols(k_ptr, ks_ptr, k_rows, s_rows, rd, rn < k_len, head_dim, IS_Q8, Q8_BLOCK).to(q.dtype)
            s = dot(q, tl.trans(k), LOW, EMULATE)
            if TAIL_D > 0:
                k_t = _cols(k_ptr, ks_ptr, k_rows, s_rows, rt, rn < k_len, head_dim, IS_Q8, Q8_BLOCK).to(q.dtype)
                s += dot(q_t, tl.trans(k_t), LOW, EMULATE)
            s *= scale
            valid = rn[None, :] < k_len
            if CAUSAL:
                valid = valid & (rn[None, :] <= (k_len - q_len) + rm[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p_low = p.to(q.dtype)  # p rounded as FlashAttention-2 does
            v = _cols(v_ptr, vs_ptr, k_rows, s_rows, rd, rn < k_len, head_dim, IS_Q8, Q8_BLOCK).to(q.dtype)
            acc = acc * alpha[:, None] + dot(p_low, v, LOW, EMULATE)
            if TAIL_D > 0:
                v_t = _cols(v_ptr, vs_ptr, k_rows, s_rows, rt, rn < k_len, head_dim, IS_Q8, Q8_BLOCK).to(q.dtype)
                acc_t = acc_t * alpha[:, None] + dot(p_low, v_t, LOW, EMULATE)
            m_i = m_new
        norm = tl.where(l_i == 0, 1.0, l_i)[:, None]
        o_rows = (q0 + rm)[:, None] * so_t + head * so_h
        tl.store(o_ptr + o_rows + rd[None, :], acc / norm, mask=q_valid & (rd[None, :] < head_dim))
        if TAIL_D > 0:
            tl.store(o_ptr + o_rows + rt[None, :], acc_t / norm, mask=q_valid & (rt[None, :] < head_dim))


def _widened(gpu: Target) -> bool:
    """Whether half-precision operands are widened to float32 before the products (dot.py's
    EMULATE): in the interpreter, and where Triton has no tensor cores (sm_75), whose dots are
    float32 FMA loops either way. Triton 3.3.1 fails to compile this kernel's float16 dots for
    sm_75 ("Unsupported rounding mode for conversion"); widened, they compile with 3.3.1 and 3.9."""
    return interpreted() or not gpu.tensor_cores


def head_dim_split(d: int) -> tuple[int, int]:
    """(BLOCK_D, TAIL_D): the largest power of two in d (at least 16, tl.dot's least K), and
    what is left padded to a power of two of at least 16 (0 when nothing is left): 80 -> (64,
    16), 128 -> (128, 0), 72 -> (64, 16), 8 -> (16, 0)."""
    main = max(16, 1 << (d.bit_length() - 1))
    rest = d - main
    return main, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def launch(gpu: Target, dtype: torch.dtype, q8_cache: bool) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) for products in `dtype`; QVL_ATTENTION_LAUNCH
    ("block_m,block_n,num_warps,num_stages") overrides them on a GPU, so that a lent machine
    can try others without a code change (scripts/gpu_session.sh). Tiles that compile for
    sm_75 ... sm_90 without register spills or too much shared memory
    (scripts/compile_kernels.py). bf16 / f16 on tensor cores (sm_80+): 64 x 64, no software
    pipelining (Triton's default 3 stages need 112 KiB of shared memory on sm_90 and spill for
    q8_0 caches on sm_86), 4 warps: with 8 Triton gives the 64 query rows to two sm_90 warp
    groups that each compute the whole q k^T (1.5x the tensor-core instructions a block at d =
    128 and d = 80), and on sm_80 to warps of 8 rows each doing 16 (2x at d = 80); a q8_0
    cache keeps 8 warps (4 spill 56-216 bytes a thread). float32 (FMA): 32 x 32, 8 warps, 2
    stages (64 x 64 spilled 10 KB a thread); sm_75, where Triton emits FMA code for f16 dots
    too: 16 x 32 (32 x 32 spills there), 16 x 16 and one stage for a q8_0 cache (16 x 32 spills
    192 bytes a thread under Triton 3.6). In the interpreter: 16 x 16, so the tests' short
    segments span several key blocks.

    sm_90 (H200, Triton 3.6, 2026-12-04, scripts/check_gpu_kernels.py): with a head-dim tail
    (d = 80: the 16-wide products) 64 x 64 on 4 warps in one stage computes wrong values
    (error 1.16 of max |out|) and, at the vision tower's sizes, made an illegal memory access;
    so did 128 x 64 on 8 warps. 64 x 64 on 4 warps in 2 stages, on 8 warps in one, and 32 x 32
    on 4 are right, as is d = 64 or 128 (no tail) under the sm_80 launch. sm_90 takes 2 stages."""
    if gpu == INTERPRETER:
        return 16, 16, 4, 1
    given = os.environ.get("QVL_ATTENTION_LAUNCH")
    if given:
        try:
            block_m, block_n, warps, stages = (int(v) for v in given.split(","))
        except ValueError:
            raise ValueError(f"QVL_ATTENTION_LAUNCH={given!r}: four integers "
                             "block_m,block_n,num_warps,num_stages") from None
        return block_m, block_n, warps, stages
    if not gpu.tensor_cores:
        return (16, 16, 8, 1) if q8_cache else (16, 32, 8, 2)
    if dtype == torch.float32:
        return 32, 32, 8, 2
    if q8_cache:
        return 64, 64, 8, 1
    return 64, 64, 4, 2 if gpu.hopper else 1


_BOUNDS_KEPT = 16  # segment-bound tensors kept on their device (bounds_on)
_bounds: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def bounds_on(cu: list[int], device: torch.device) -> torch.Tensor:
    """`cu` as an int32 tensor on `device`, made once for the last few distinct lists: a vision
    tower's 32 layers use two (windows, whole images), and each copy from host memory made
    the host wait for the GPU's queue to drain (64 such copies an encode on an H200, where 68
    pageable copies, the image's patches among them, took 7.3 ms)."""
    key = (tuple(cu), device)
    t = _bounds.get(key)
    if t is None:
        if len(_bounds) >= _BOUNDS_KEPT:
            del _bounds[next(iter(_bounds))]  # the oldest made
        t = _bounds[key] = torch.tensor(cu, dtype=torch.int32, device=device)
    return t


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int],
              causal: bool, dtype: torch.dtype = torch.float32, block_m: int | None = None,
              block_n: int | None = None, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None, num_warps: int | None = None,
              num_stages: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (tokens_q, heads, d), k/v (tokens_k, kv_heads, d) -> (tokens_q, heads, d) in
    `out_dtype` (float32 unless the caller's next product takes another).
    k and v: float, or int8 with `k_scale` / `v_scale` (tokens_k, kv_heads, d // block) float16
    for a q8_0 cache; views with a contiguous last dimension are read in place (a KV cache's
    (kv_heads, capacity, d) buffer transposed and cut to the keys, or q, k and v cut from one
    product), as are q8_0 caches.

    `dtype`: what q, k, v are multiplied in: float32 (exact products), or bfloat16 / float16
    (tensor cores; the softmax probabilities are rounded to it too). Accumulation is float32.
    Unset launch parameters take `launch`'s defaults for the GPU (or the interpreter)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"attention in {dtype}: float32, bfloat16 or float16")
    tq, heads, d = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    is_q8 = k.dtype == torch.int8
    if is_q8 != (k_scale is not None and v_scale is not None):
        raise ValueError("int8 (q8_0) keys and values need k_scale and v_scale, float ones none")
    gpu = target(q.device)
    defaults = launch(gpu, dtype, is_q8)
    block_m, block_n, num_warps, num_stages = (given or default for given, default in
                                               zip((block_m, block_n, num_warps, num_stages), defaults))
    q = q.to(dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if not is_q8 and (k.dtype != dtype or k.stride(-1) != 1 or k.stride() != v.stride()):
        k, v = k.to(dtype).contiguous(), v.to(dtype).contiguous()  # else read in place
    assert k.stride() == v.stride() and k.stride(-1) == 1
    ks = k_scale if k_scale is not None else k
    vs = v_scale if v_scale is not None else v
    if is_q8:
        assert ks.stride() == vs.stride() and ks.stride(-1) == 1
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    cq, ck = bounds_on(cu_q, q.device), bounds_on(cu_k, q.device)
    longest = max(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
    block_d, tail_d = head_dim_split(d)
    grid = (triton.cdiv(longest, block_m), heads, len(cu_q) - 1)
    attention_kernel[grid](q, k, v, ks, vs, out, cq, ck, d, heads // kv_heads, d ** -0.5,
                           q.stride(0), q.stride(1), k.stride(0), k.stride(1), ks.stride(0), ks.stride(1),
                           out.stride(0), out.stride(1),
                           CAUSAL=causal, LOW=dtype != torch.float32, EMULATE=_widened(gpu), IS_Q8=is_q8,
                           Q8_BLOCK=d // k_scale.shape[-1] if k_scale is not None else d,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, TAIL_D=tail_d,
                           num_warps=num_warps, num_stages=num_stages)
    return out


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int],
                  causal: bool) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q, dtype=torch.float32)
    for (a, b), (c, e) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        qs = q[a:b].transpose(0, 1).float()
        ks = k[c:e].transpose(0, 1).float().repeat_interleave(group, 0)
        vs = v[c:e].transpose(0, 1).float().repeat_interleave(group, 0)
        mask = None
        if causal:
            mask = torch.ones(b - a, e - c, dtype=torch.bool, device=q.device).tril(diagonal=(e - c) - (b - a))
        out[a:b] = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask)[0].transpose(0, 1)
    return out
