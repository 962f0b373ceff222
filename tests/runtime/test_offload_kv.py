"""runtime/offload_kv.py: an offloaded layer's mirror of its CPU cache holds, after each pass,
exactly what the cache reads back (every cache type: float ones converted where the mirror is,
q8_0 read back as the cache rounded it), in the attention's dtype where it has one, and refuses
a pass out of turn. The mirror is on the
CPU here and also on CUDA where there is one (the conversion there must round as the CPU's store)."""

from __future__ import annotations

import pytest
import torch

from qvl.runtime.config import TextConfig
from qvl.runtime.decoder import KV_TYPES, KVCache
from qvl.runtime.offload_kv import KVMirror, Span

CFG = TextConfig(arch="qwen2vl", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, context_length=128,
                 rope_theta=1e6, rms_eps=1e-6, mrope_section=(8, 12, 12), n_vocab=100)  # head_dim 64: two q8_0 blocks
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kv(seq: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(CFG.n_head_kv, seq, CFG.head_dim, generator=g) * 3 for _ in range(2))
    return k.to(device), v.to(device)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KV_TYPES)
def test_the_mirror_reads_as_the_cache(kind, device, dtype):
    """None: as the cache reads; bf16: that converted, as kernels/attention.py converts what it
    reads (an f16 cache's keys rounded to f16 first, then to bf16)."""
    cache = KVCache(CFG, 40, kind=kind)
    cache.write(1, *_kv(7, 0, "cpu"))  # tokens before the span, cached by an earlier prompt
    cache.length = 7
    mirror = KVMirror(Span(cache, 7, 7 + 5 + 1 + 13), 1, torch.device(device), dtype)
    assert mirror.k.shape[1] == 26 and mirror.filled == 7
    for seq, seed in ((5, 1), (1, 2), (13, 3)):  # passes of odd lengths, one of a single token
        k, v = _kv(seq, seed, device)
        end = cache.write(1, k, v)
        keys, values = mirror.extend(cache.length, end, k, v)
        want_k, want_v = (t.to(dtype or t.dtype) for t in cache.read(1, end))
        assert keys.device.type == device and keys.dtype == want_k.dtype
        assert torch.equal(keys.cpu(), want_k) and torch.equal(values.cpu(), want_v)
        cache.length = end
    assert torch.equal(cache.read(0, 26)[0], torch.zeros_like(cache.read(0, 26)[0]))  # layer 0 untouched


def test_a_pass_out_of_turn_or_past_the_room_is_refused():
    cache = KVCache(CFG, 40)
    mirror = KVMirror(Span(cache, 0, 8), 0, torch.device("cpu"))
    k, v = _kv(4, 0, "cpu")
    with pytest.raises(RuntimeError, match=r"offloaded layer 0: tokens \[2, 6\) after 0 mirrored"):
        mirror.extend(2, 6, k, v)
    mirror.extend(0, 4, k, v)
    with pytest.raises(RuntimeError, match=r"tokens \[4, 12\) after 4 mirrored, with room for 8"):
        mirror.extend(4, 12, *_kv(8, 1, "cpu"))


def test_the_room_stops_at_the_cache_capacity():
    mirror = KVMirror(Span(KVCache(CFG, 40), 0, 100), 0, torch.device("cpu"))
    assert mirror.k.shape == mirror.v.shape == (CFG.n_head_kv, 40, CFG.head_dim)
