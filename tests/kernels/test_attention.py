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

from qvl.kernels.attention import attention, attention_ref

ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _qkv(tq, tk, heads, kv_heads, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tq, heads, d, generator=g), torch.randn(tk, kv_heads, d, generator=g),
            torch.randn(tk, kv_heads, d, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments,heads,d", [
    ([64, 16, 80, 4], 2, 80),   # vision windows of unequal size, head dim 80
    ([131], 3, 80),             # one full-attention image, odd length
    ([1], 1, 16),               # a single patch
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


def test_rejects_bad_gqa():
    q, k, v = _qkv(4, 4, 3, 2, 16, 0)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v, [0, 4], [0, 4], causal=True)
