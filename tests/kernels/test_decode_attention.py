"""Split-K decode attention over the KV cache against its torch reference (interpreted).

Tolerance table (max |kernel - reference|, outputs of size ~1):
| cache | atol | why |
| f32 | 2e-5 | online softmax rescaling per block and per split, another summation order |
| bf16 | 2e-5 | both read the same stored bf16 values and compute in float32: same as f32 |
| q8_0 | 2e-5 | both dequantize the same int8 values and float16 scales exactly: same as f32 |
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import pytest
import torch
from interpret import ACCEL

from qvl.kernels.decode_attention import decode_attention, decode_attention_ref

ATOL = {"f32": 2e-5, "bf16": 2e-5, "q8_0": 2e-5}


def _cache(kv_heads, capacity, d, kind, g):
    x = (torch.randn(kv_heads, capacity, d, generator=g) * 2).to(ACCEL)
    if kind == "f32":
        return x, None
    if kind == "bf16":
        return x.to(torch.bfloat16), None
    block = 32 if d % 32 == 0 else d
    blocks = x.unflatten(-1, (-1, block))
    scale = (blocks.abs().amax(-1) / 127).to(torch.float16)
    q = (blocks / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8).flatten(-2)
    return q, scale


@pytest.mark.parametrize("kind", ["f32", "bf16", "q8_0"])
@pytest.mark.parametrize("heads,kv_heads,d,capacity,length,splits", [
    (2, 1, 64, 300, 1, None),       # one key: the first token after an empty prompt; GQA 2
    (7, 1, 80, 131, 131, 3),        # GQA 7, head dim 80 (q8_0: one scale per head), a full cache
    (3, 1, 80, 131, 100, 1),        # one split: the program normalizes its own output
    (4, 4, 16, 200, 131, 4),        # no GQA; splits past `length` hold no keys
    (14, 2, 128, 1000, 517, None),  # GQA 7 with two KV heads, the default split count
])
def test_matches_reference(kind, heads, kv_heads, d, capacity, length, splits):
    g = torch.Generator().manual_seed(heads * 1000 + length)
    q = torch.randn(heads, d, generator=g).to(ACCEL)
    k, ks = _cache(kv_heads, capacity, d, kind, g)
    v, vs = _cache(kv_heads, capacity, d, kind, g)
    got = decode_attention(q, k, v, torch.tensor([length], dtype=torch.int32, device=ACCEL), ks, vs, splits=splits)
    ref = decode_attention_ref(q, k, v, length, ks, vs)
    assert got.shape == (heads, d)
    assert (got - ref).abs().max().item() <= ATOL[kind]


def test_keys_past_length_are_ignored():
    """The same cache read to two lengths: garbage after `length` changes nothing."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 32, generator=g).to(ACCEL)
    k, v = torch.randn(2, 160, 32, generator=g).to(ACCEL), torch.randn(2, 160, 32, generator=g).to(ACCEL)
    n = torch.tensor([70], dtype=torch.int32, device=ACCEL)
    before = decode_attention(q, k, v, n, splits=2)
    k[:, 70:] = 1e4
    v[:, 70:] = float("nan")
    assert torch.equal(decode_attention(q, k, v, n, splits=2), before)


def test_same_bits_every_launch():
    """The last split to arrive combines in split order, so repeated launches give identical bits.
    On a GPU (the device's kernel stage): the 7B's 28 / 4 heads over 3000 of 4096 cached keys,
    200 launches with the default split count, where a partial read before it is written would
    show; in the interpreter (programs in order) a small cache 3 times."""
    gpu = ACCEL == "cuda"
    heads, kv_heads, d, capacity, length, repeats = (28, 4, 128, 4096, 3000, 200) if gpu else (4, 2, 32, 300, 250, 3)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(heads, d, generator=g).to(ACCEL)
    k, _ = _cache(kv_heads, capacity, d, "bf16", g)
    v, _ = _cache(kv_heads, capacity, d, "bf16", g)
    n = torch.tensor([length], dtype=torch.int32, device=ACCEL)
    first = decode_attention(q, k, v, n, splits=None if gpu else 3)
    assert (first - decode_attention_ref(q, k, v, length)).abs().max().item() <= ATOL["bf16"]
    for _ in range(repeats):
        assert torch.equal(decode_attention(q, k, v, n, splits=None if gpu else 3), first)


def test_large_scores_do_not_overflow():
    """Scores of ~1e4 (huge keys): the running max keeps exp() finite."""
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(2, 16, generator=g) * 100).to(ACCEL)
    k, v = (torch.randn(1, 100, 16, generator=g) * 100).to(ACCEL), torch.randn(1, 100, 16, generator=g).to(ACCEL)
    n = torch.tensor([100], dtype=torch.int32, device=ACCEL)
    got = decode_attention(q, k, v, n, splits=3)
    assert torch.isfinite(got).all()
    assert (got - decode_attention_ref(q, k, v, 100)).abs().max().item() <= 2e-5


def test_rejects_mismatched_inputs():
    q = torch.randn(3, 16)
    k = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q, k, k, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_scale"):
        decode_attention(torch.randn(2, 16), k.to(torch.int8), k.to(torch.int8), torch.tensor([4], dtype=torch.int32))
