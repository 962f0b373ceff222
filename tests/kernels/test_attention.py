"""Varlen / causal GQA attention kernel against F.scaled_dot_product_attention (interpreted).

Tolerance table (outputs of size ~1; the reference computes in float32 from the same inputs):
| case | dtype | atol | why |
| all | float32 | 2e-5 | online softmax rescaling and another summation order (~1e-6 typical) |
| all | bfloat16 | 2e-2 | q, k, v and the probabilities rounded to bf16 (2^-9 relative) before the products |
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import pytest
import torch
from interpret import ACCEL

from qvl.kernels.attention import _BOUNDS_KEPT, attention, attention_ref, bounds_on, head_dim_split

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _qkv(tq, tk, heads, kv_heads, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tq, heads, d, generator=g).to(ACCEL), torch.randn(tk, kv_heads, d, generator=g).to(ACCEL),
            torch.randn(tk, kv_heads, d, generator=g).to(ACCEL))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments,heads,d", [
    ([64, 16, 80, 4], 2, 80),   # vision windows of unequal size, head dim 80
    ([131], 3, 80),             # one full-attention image, odd length
    ([1], 1, 16),               # a single patch
    ([20, 9], 2, 72),           # 64 + a tail of 8 padded to 16
    ([33], 1, 96),              # 64 + a tail of 32
])
def test_varlen_non_causal(segments, heads, d, dtype):
    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    q, k, v = _qkv(cu[-1], cu[-1], heads, heads, d, seed=len(segments))
    got = attention(q, k, v, cu, cu, causal=False, dtype=dtype)
    err = (got - attention_ref(q, k, v, cu, cu, causal=False)).abs().max()
    assert got.dtype == torch.float32 and err.item() <= ATOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,past,heads,kv_heads", [(131, 0, 4, 2), (1, 37, 7, 1), (5, 20, 14, 2),
                                                       (17, 0, 4, 4), (1, 0, 2, 1),
                                                       (40, 10, 4, 2)])  # query blocks end mid key block
def test_causal_gqa_with_cache(q_len, past, heads, kv_heads, dtype):
    d = 16
    q, k, v = _qkv(q_len, past + q_len, heads, kv_heads, d, seed=q_len + past)
    cu_q, cu_k = [0, q_len], [0, past + q_len]
    got = attention(q, k, v, cu_q, cu_k, causal=True, dtype=dtype)
    ref = attention_ref(q, k, v, cu_q, cu_k, causal=True)
    assert (got - ref).abs().max().item() <= ATOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0"])
@pytest.mark.parametrize("q_len,past,d", [(5, 20, 64), (33, 0, 80), (1, 47, 32)])
def test_causal_reads_the_cache_in_place(kind, dtype, q_len, past, d):
    """Prefill over a KV cache as decoder.KVCache stores it: (kv_heads, capacity, d) buffers
    transposed and cut to the keys so far, not copied; q8_0 as int8 with a float16 scale per
    32 values (per head when d is not a multiple of 32: d = 80 here takes 16-value blocks so
    the scale index varies inside a row). Against the reference on the dequantized keys."""
    heads, kv_heads, capacity = 4, 2, 64
    end = past + q_len
    q, k, v = _qkv(q_len, end, heads, kv_heads, d, seed=d + q_len)
    bufs, scales = [], []
    for x in (k, v):
        buf = torch.zeros(kv_heads, capacity, d, device=ACCEL)
        buf[:, :end] = x.transpose(0, 1)
        if kind == "q8_0":
            block = 32 if d % 32 == 0 else 16
            blocks = buf.unflatten(-1, (-1, block))
            scale = (blocks.abs().amax(-1) / 127).to(torch.float16)
            q8 = torch.where(scale[..., None] > 0, blocks / scale.float()[..., None].clamp_min(1e-30), 0)
            bufs.append(q8.round().to(torch.int8).flatten(-2))
            scales.append(scale)
        else:
            bufs.append(buf.to(torch.float32 if kind == "f32" else torch.bfloat16))
    views = [b.transpose(0, 1)[:end] for b in bufs]
    scale_views = [sc.transpose(0, 1)[:end] for sc in scales] if scales else [None, None]
    if kind == "q8_0":
        dense = [(b.float().unflatten(-1, (sc.shape[-1], -1)) * sc.float()[..., None]).flatten(-2)
                 for b, sc in zip(views, scale_views)]
    else:
        dense = [b.float() for b in views]
        assert views[0].stride(-1) == 1 and not views[0].is_contiguous()  # read in place, not copied
    got = attention(q, *views, [0, q_len], [0, end], causal=True, dtype=dtype, k_scale=scale_views[0],
                    v_scale=scale_views[1])
    ref = attention_ref(q, *dense, [0, q_len], [0, end], causal=True)
    assert (got - ref).abs().max().item() <= ATOL[dtype]


def test_rejects_bad_gqa():
    q, k, v = _qkv(4, 4, 3, 2, 16, 0)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v, [0, 4], [0, 4], causal=True)
    q, k, v = _qkv(4, 4, 2, 2, 32, 0)
    with pytest.raises(ValueError, match="k_scale"):
        attention(q, k.to(torch.int8), v.to(torch.int8), [0, 4], [0, 4], causal=True)


@pytest.mark.parametrize("d,split", [(80, (64, 16)), (128, (128, 0)), (72, (64, 16)), (96, (64, 32)), (8, (16, 0)),
                                     (16, (16, 0)), (130, (128, 16))])
def test_head_dim_split_covers_d_with_little_padding(d, split):
    """The vision tower's 80 is 64 + 16 (not padded to 128); every part is a power of two >= 16."""
    main, tail = head_dim_split(d)
    assert (main, tail) == split
    assert main + tail >= d and (tail == 0 or main < d)


@pytest.mark.parametrize("segments", [[64, 16, 51], [1]])
def test_views_of_one_product_in_place_bf16_out(segments):
    """The vision tower's kernel path: q, k and v are bf16 views into one (tokens, 3 * heads *
    d) product (token stride 3 x heads x d), read where they are, and the output is bf16 (the o
    projection's input). Against the reference on the same bf16 values: bf16's tolerance
    (table) plus the output's own rounding to bf16 (2^-8 of |out| <= ~1 when rounded to
    nearest, 2^-7 when Triton's interpreter truncates)."""
    heads, d = 2, 80
    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    g = torch.Generator().manual_seed(cu[-1])
    qkv = torch.randn(cu[-1], 3 * heads * d, generator=g).bfloat16().to(ACCEL)
    q, k, v = (t.view(cu[-1], heads, d) for t in qkv.split(heads * d, dim=-1))
    assert cu[-1] == 1 or not q.is_contiguous()
    got = attention(q, k, v, cu, cu, causal=False, dtype=torch.bfloat16, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    ref = attention_ref(q.cpu().float(), k.cpu().float(), v.cpu().float(), cu, cu, causal=False)
    assert (got.cpu().float() - ref).abs().max().item() <= ATOL[torch.bfloat16] + 2 ** -7


def test_segment_bounds_made_once_and_bounded():
    """bounds_on gives the same device tensor for the same list (one host copy, not one a
    layer), the list's values, and keeps at most _BOUNDS_KEPT lists."""
    dev = torch.device(ACCEL)
    a = bounds_on([0, 5, 9], dev)
    assert a is bounds_on([0, 5, 9], dev) and a.tolist() == [0, 5, 9] and a.dtype == torch.int32
    for n in range(_BOUNDS_KEPT):
        bounds_on([0, 100 + n], dev)
    assert bounds_on([0, 5, 9], dev) is not a  # the oldest was let go
    from qvl.kernels import attention as module
    assert len(module._bounds) <= _BOUNDS_KEPT
