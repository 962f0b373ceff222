"""kernels/kv_store.py against index_copy_ (its reference): bit-identical caches, because both
round float32 to the cache type to nearest even and nothing else is computed."""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)

import pytest
import torch

from qvl.kernels.kv_store import kv_store, kv_store_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,d,slot", [(1, 16, 0), (2, 80, 6), (4, 128, 7)])  # first, middle and last slot
def test_matches_index_copy(dtype, heads, d, slot):
    capacity = 8
    g = torch.Generator().manual_seed(d + slot)
    cache = [torch.randn(heads, capacity, d, generator=g).to(dtype) for _ in range(2)]
    # k and v as the decoder leaves them: head-strided views of one projection output
    qkv = torch.randn(1, 3 * heads * d, generator=g) * 100
    # exact ties between two bf16 values (round to the even one), a float16 tie, inf (not float32
    # denormals: Triton's interpreter flushes them to zero in the bf16 conversion)
    qkv[0, heads * d:heads * d + 5] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -11,
                                                    float("inf")])
    k = qkv[:, heads * d:2 * heads * d].view(1, heads, d).transpose(0, 1)
    v = qkv[:, 2 * heads * d:].view(1, heads, d).transpose(0, 1)
    index = torch.tensor([slot])
    got = [c.clone() for c in cache]
    want = [c.clone() for c in cache]
    kv_store(k, v, *got, index)
    kv_store_ref(k, v, *want, index)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(got[0][:, slot], cache[0][:, slot])  # the slot changed...
    others = [i for i in range(capacity) if i != slot]
    assert torch.equal(got[1][:, others], cache[1][:, others])  # ...and nothing else
