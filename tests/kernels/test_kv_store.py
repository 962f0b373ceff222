"""kernels/kv_store.py against its references: float caches bit-identical to index_copy_ (both
round float32 to the cache type to nearest even and nothing else is computed); q8_0 caches
bit-identical to the runtime's torch quantizer (same IEEE divisions, same half-to-even rounding)."""

from __future__ import annotations

from types import SimpleNamespace

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)

import pytest
import torch
from interpret import ACCEL

from qvl.kernels.kv_store import kv_store, kv_store_q8, kv_store_q8_ref, kv_store_ref
from qvl.runtime.decoder import KVCache, q8_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,d,slot", [(1, 16, 0), (2, 80, 6), (4, 128, 7)])  # first, middle and last slot
def test_matches_index_copy(dtype, heads, d, slot):
    capacity = 8
    g = torch.Generator().manual_seed(d + slot)
    cache = [torch.randn(heads, capacity, d, generator=g).to(ACCEL, dtype) for _ in range(2)]
    # k and v as the decoder leaves them: head-strided views of one projection output
    qkv = torch.randn(1, 3 * heads * d, generator=g) * 100
    # exact ties between two bf16 values (round to the even one), a float16 tie, inf (not float32
    # denormals: Triton's interpreter flushes them to zero in the bf16 conversion)
    qkv[0, heads * d:heads * d + 5] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -11,
                                                    float("inf")])
    qkv = qkv.to(ACCEL)
    k = qkv[:, heads * d:2 * heads * d].view(1, heads, d).transpose(0, 1)
    v = qkv[:, 2 * heads * d:].view(1, heads, d).transpose(0, 1)
    index = torch.tensor([slot], device=ACCEL)
    got = [c.clone() for c in cache]
    want = [c.clone() for c in cache]
    kv_store(k, v, *got, index)
    kv_store_ref(k, v, *want, index)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(got[0][:, slot], cache[0][:, slot])  # the slot changed...
    others = [i for i in range(capacity) if i != slot]
    assert torch.equal(got[1][:, others], cache[1][:, others])  # ...and nothing else


@pytest.mark.parametrize("heads,d,slot", [(1, 32, 0), (2, 80, 5), (4, 128, 7), (3, 64, 2)])
def test_q8_0_matches_torch_quantizer(heads, d, slot):
    """d = 80: one block of 80 (not a power of two); d = 128: four blocks of 32."""
    capacity, block = 8, q8_block(d)
    g = torch.Generator().manual_seed(d * 10 + slot)
    qkv = torch.randn(1, 3 * heads * d, generator=g) * 10
    k = qkv[:, heads * d:2 * heads * d].view(1, heads, d).transpose(0, 1)
    v = qkv[:, 2 * heads * d:].view(1, heads, d).transpose(0, 1)
    # a block with amax 127 (d = 1): exact halves, which round to the even integer (2.5 -> 2, -3.5 -> -4)
    k[0, 0, :block] = 0.0
    k[0, 0, :5] = torch.tensor([127.0, 2.5, -3.5, 0.5, -126.5])
    v[-1, 0, :block] = 0.0  # an all-zero block: scale 0, values 0
    k, v = k.to(ACCEL), v.to(ACCEL)
    index = torch.tensor([slot], device=ACCEL)

    def cache():
        g2 = torch.Generator().manual_seed(1)
        values = [torch.randint(-127, 128, (heads, capacity, d), generator=g2, dtype=torch.int8) for _ in range(2)]
        scales = [torch.rand(heads, capacity, d // block, generator=g2).half() for _ in range(2)]
        return [t.to(ACCEL) for t in values + scales]

    got, want = cache(), cache()
    kv_store_q8(k, v, *got, index)
    kv_store_q8_ref(k, v, *want, index)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[0][0, slot, :5].tolist() == [127, 2, -4, 0, -126]
    assert (got[3][-1, slot, 0] == 0).item() and not got[1][-1, slot, :block].any()
    others = [i for i in range(capacity) if i != slot]
    assert torch.equal(got[2][:, others], cache()[2][:, others])  # only the slot changed


def test_cache_write_at_uses_the_kernel_for_q8_0():
    """KVCache.write_at (the graph path's store) fills a q8_0 cache as KVCache.write does."""
    cfg = SimpleNamespace(n_head_kv=2, head_dim=64, n_layer=1)  # what KVCache reads of a TextConfig
    a, b = (KVCache(cfg, 4, [torch.device(ACCEL)], kind="q8_0") for _ in range(2))
    g = torch.Generator().manual_seed(0)
    for slot in range(3):
        k, v = torch.randn(2, 1, 64, generator=g).to(ACCEL), torch.randn(2, 1, 64, generator=g).to(ACCEL)
        a.write_at(0, torch.tensor([slot], device=ACCEL), k, v)
        b.write(0, k, v)
        b.length += 1
    for x, y in zip(a.stored(0), b.stored(0)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0"])
@pytest.mark.parametrize("heads,kv_heads,d,slot", [(2, 1, 16, 0), (7, 1, 80, 3), (4, 2, 128, 5), (28, 4, 64, 1)])
def test_rotary_in_the_store(kind, heads, kv_heads, d, slot):
    """The decode step's rotary in the store's launch: q (heads of the stacked projection
    output) rotated in place and k rotated as stored, against rope.py's kernel on the same views
    then the plain store. q: the same expressions (tolerance 2e-6 of max|q| for cos/sin and
    contraction); k: the same value up to a float32 rounding before the cache's rounding: one
    bf16 unit (2^-8 relative), a q8_0 step (one scale d) at most."""
    from qvl.kernels.rope import apply_rope_

    g = torch.Generator().manual_seed(heads * d + slot)
    qkv = (torch.randn(1, (heads + 2 * kv_heads) * d, generator=g) * 3).to(ACCEL)
    theta = (torch.rand(1, d // 2, generator=g) * 1000).to(ACCEL)
    index = torch.tensor([slot], device=ACCEL)

    def views(t):
        q = t[:, :heads * d].view(1, heads, d).transpose(0, 1)
        k = t[:, heads * d:(heads + kv_heads) * d].view(1, kv_heads, d).transpose(0, 1)
        return q, k, t[:, (heads + kv_heads) * d:].view(1, kv_heads, d).transpose(0, 1)

    def cache():
        if kind == "q8_0":
            block = q8_block(d)
            return ([torch.zeros(kv_heads, 8, d, dtype=torch.int8, device=ACCEL) for _ in range(2)]
                    + [torch.zeros(kv_heads, 8, d // block, dtype=torch.float16, device=ACCEL) for _ in range(2)])
        dtype = torch.float32 if kind == "f32" else torch.bfloat16
        return [torch.zeros(kv_heads, 8, d, dtype=dtype, device=ACCEL) for _ in range(2)]

    store = kv_store_q8 if kind == "q8_0" else kv_store
    fused, plain = qkv.clone(), qkv.clone()
    got, want = cache(), cache()
    q, k, v = views(fused)
    store(k, v, *got, index, q=q, theta=theta[0])
    q_ref, k_ref, v_ref = views(plain)
    apply_rope_(q_ref.transpose(0, 1), theta, k_ref.transpose(0, 1))
    store(k_ref, v_ref, *want, index)
    assert (q - q_ref).abs().max().item() <= 2e-6 * q_ref.abs().max().item()
    assert torch.equal(fused[:, heads * d:], qkv[:, heads * d:])  # k rotated into the cache only, v untouched
    if kind == "q8_0":
        deq = [(c[0].float().unflatten(-1, (-1, q8_block(d))) * c[1].float()[..., None]).flatten(-2)
               for c in ((got[0], got[2]), (want[0], want[2]), (got[1], got[3]), (want[1], want[3]))]
        step = want[2].float().repeat_interleave(q8_block(d), -1)
        assert ((deq[0] - deq[1]).abs() <= step * 1.01 + 1e-6).all()  # k: a quantization step at most
        assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])  # v: the same bits
    else:
        assert torch.equal(got[1], want[1])
        tol = 2e-6 if kind == "f32" else 2 ** -8
        assert ((got[0].float() - want[0].float()).abs() <= tol * want[0].float().abs().max()).all()
