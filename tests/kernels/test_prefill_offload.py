"""Prompts through the CPU's decoder layers on the accelerator (runtime/decoder.py's
prefill_offload, as llama.cpp's op offload): with the last layer on the accelerator and the
others on the CPU, a forward pass of OFFLOAD_MIN_TOKENS or more runs every CPU layer from a copy
made for the pass, its KV cache left on the CPU; decode steps run where the layers live. The CPU
stands in for the accelerator (the kernels in the interpreter).

Tolerances: logits within 1e-4 of the largest, the KV cache within 1e-4 of its largest value,
greedy tokens equal. Both runs are float32 (EXACT weights); an offloaded layer multiplies
through the kernels' float32 products, the CPU's layer through torch, in another summation order
(as the kernel-path tests' 1e-4). With a q8_0 cache, 5e-3 and 1e-2: a k or v that lands near a
rounding boundary may round to the neighbouring code (1/127 of its block's largest value;
measured 5.0e-4 of the largest logit).
"""

from __future__ import annotations

import gc
import weakref

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import numpy as np
import pytest
import torch
from interpret import ACCEL
from PIL import Image

import qvl.runtime.model as model_module
from qvl.runtime import decoder as decoder_module
from qvl.runtime.copy_ahead import OFFLOAD_COPIES
from qvl.runtime.loader import load
from qvl.runtime.placement import Placement
from tiny_models import TinySpec, make_checkpoint, to_gguf

IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8))
TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    spec = TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=3, vocab_size=1280,
                    dtype=torch.float32, std=0.15, seed=5)
    return make_checkpoint(tmp_path_factory.mktemp("offload") / "ckpt", spec)


@pytest.fixture(scope="module")
def path(checkpoint):
    return to_gguf(checkpoint, checkpoint.parent / "m-q8_0.gguf", "q8_0", "f32")


@pytest.fixture(scope="module")
def f32(checkpoint):
    return to_gguf(checkpoint, checkpoint.parent / "m-f32.gguf", "f32", "f32")


def _generate(path, offload: bool, kv_type: str, monkeypatch, kernels: bool = True):
    """(generation, logits the sampler saw, the CPU layers' caches, offloaded copies made per
    Decoder.forward pass, every copy made)."""
    model = load(path, device=ACCEL, dtype=torch.float32,
                 placement=Placement(ACCEL, 1, kv_type=kv_type, prefill_offload=offload, kernels=kernels))
    made: list[int] = []
    copies: list[int] = []
    passes: list[list[int]] = []
    real_layer, real_forward = model.decoder._layer, model.decoder.forward

    def layer(i, accel):
        made.append(i)
        copies.append(i)
        return real_layer(i, accel)

    def forward(x, positions, cache):
        made.clear()
        out = real_forward(x, positions, cache)
        passes.append([x.shape[0], *made])
        return out

    monkeypatch.setattr(model.decoder, "_layer", layer)
    monkeypatch.setattr(model.decoder, "forward", forward)
    seen = []
    sample = model_module.sample

    def recording(logits, history, params, gen):
        seen.append(logits.clone())
        return sample(logits, history, params, gen)

    monkeypatch.setattr(model_module, "sample", recording)
    try:
        out = model.generate("Describe it.", [IMAGE], max_new_tokens=TOKENS)
    finally:
        monkeypatch.setattr(model_module, "sample", sample)
    cache = model._kept
    assert cache is not None
    kv = [cache.read(i, cache.length) for i in range(2)]
    return out, torch.stack(seen), kv, passes, copies


@pytest.mark.parametrize("kv_type", ["f32", "q8_0"])
def test_offloaded_prefill_equals_the_cpu_layers(path, monkeypatch, kv_type):
    out, logits, kv, passes, _ = _generate(path, True, kv_type, monkeypatch)
    ref, ref_logits, ref_kv, ref_passes, _ = _generate(path, False, kv_type, monkeypatch)
    assert out.prompt_tokens >= decoder_module.OFFLOAD_MIN_TOKENS
    assert passes[0] == [out.prompt_tokens, 0, 1]  # the prompt: the two CPU layers, each copied once
    assert all(p == [1] for p in passes[1:]) and len(passes) > 1  # decode steps: none
    assert all(p == [1] for p in ref_passes[1:]) and ref_passes[0] == [out.prompt_tokens]
    assert out.token_ids == ref.token_ids and len(set(ref.token_ids)) > 1
    tol = 1e-4 if kv_type == "f32" else 5e-3  # q8_0: a k or v near a rounding boundary may round the other way
    assert (logits - ref_logits).abs().max() <= tol * ref_logits.abs().max()
    for (k, v), (rk, rv) in zip(kv, ref_kv):  # what the offloaded layers left in the CPU's cache
        assert k.device.type == "cpu" and k.shape == rk.shape
        tol = 1e-4 if kv_type == "f32" else 1e-2  # q8_0: one step of 1/127 of a block's largest value
        assert (k - rk).abs().max() <= tol * rk.abs().max() and (v - rv).abs().max() <= tol * rv.abs().max()


def test_short_passes_stay_on_the_cpu(path, monkeypatch):
    """A prompt under OFFLOAD_MIN_TOKENS is read by the CPU's layers where they are."""
    monkeypatch.setattr(decoder_module, "OFFLOAD_MIN_TOKENS", 10_000)
    _, _, _, passes, _ = _generate(path, True, "f32", monkeypatch)
    assert passes[0][1:] == [] and all(p == [1] for p in passes[1:])


def test_offloaded_prefill_through_torch(f32, monkeypatch):
    """--no-triton on a GPU (or one older than Triton supports): an offloaded layer multiplies
    dense copies (float32 here: an F32 file) and attends through torch."""
    out, logits, kv, passes, _ = _generate(f32, True, "f32", monkeypatch, kernels=False)
    ref, ref_logits, ref_kv, _, _ = _generate(f32, False, "f32", monkeypatch, kernels=False)
    assert passes[0] == [out.prompt_tokens, 0, 1] and out.token_ids == ref.token_ids
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    for (k, v), (rk, rv) in zip(kv, ref_kv):
        assert (k - rk).abs().max() <= 1e-4 * rk.abs().max() and (v - rv).abs().max() <= 1e-4 * rv.abs().max()


@pytest.mark.parametrize("kernels", [True, False])
def test_prompt_passes_share_each_copy(path, f32, monkeypatch, kernels):
    """A prompt of several passes goes through the layers a group of passes at a time, layer by
    layer: each CPU layer copied once a group, not once a pass; each pass attends to the keys of
    the passes before it, as the CPU's layers pass by pass do (same passes, same tolerances)."""
    file = path if kernels else f32
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(decoder_module, "OFFLOAD_GROUP", 24)  # 3 passes a group
    out, logits, kv, passes, copies = _generate(file, True, "f32", monkeypatch, kernels)
    ref, ref_logits, ref_kv, ref_passes, _ = _generate(file, False, "f32", monkeypatch, kernels)
    n = out.prompt_tokens
    groups = -(-n // 24)
    assert n > 24 and groups >= 2
    assert ref_passes[:-(-n // 8)] == [[8]] * (n // 8) + ([[n % 8]] if n % 8 else [])  # the reference: pass by pass
    # the prompt's groups, each copying both CPU layers once (a last group of one pass through forward)
    assert copies == [0, 1] * groups
    assert out.token_ids == ref.token_ids and len(set(ref.token_ids)) > 1
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    for (k, v), (rk, rv) in zip(kv, ref_kv):
        assert (k - rk).abs().max() <= 1e-4 * rk.abs().max() and (v - rv).abs().max() <= 1e-4 * rv.abs().max()


def test_each_copy_is_made_while_the_layer_before_runs(path, monkeypatch):
    """With every layer on the CPU (gpu_layers 0), a prompt's three copies are made in order,
    each while the layer before it runs (copy_ahead.py), never more than OFFLOAD_COPIES alive, and
    none after the prompt; the answer is the CPU layers' (tolerances as above)."""
    model = load(path, device=ACCEL, dtype=torch.float32, placement=Placement(ACCEL, 0, kv_type="f32"))
    ref = load(path, device=ACCEL, dtype=torch.float32,
               placement=Placement(ACCEL, 0, kv_type="f32", prefill_offload=False))
    alive: set[int] = set()
    events: list[tuple[str, int, int]] = []  # (what, layer, copies alive)
    real_layer, real_forward = model.decoder._layer, model.decoder.layer_forward

    def layer(i, accel):
        copy = real_layer(i, accel)
        alive.add(i)
        weakref.finalize(copy, alive.discard, i)
        events.append(("made", i, len(alive)))
        return copy

    def layer_forward(run, x, *rest):
        gc.collect()
        events.append(("ran offloaded" if run.kernels else "ran on the CPU", -1, len(alive)))
        return real_forward(run, x, *rest)

    monkeypatch.setattr(model.decoder, "_layer", layer)
    monkeypatch.setattr(model.decoder, "layer_forward", layer_forward)
    out = model.generate("Describe it.", [IMAGE], max_new_tokens=TOKENS)
    gc.collect()
    expected = ref.generate("Describe it.", [IMAGE], max_new_tokens=TOKENS)
    assert out.prompt_tokens >= decoder_module.OFFLOAD_MIN_TOKENS and out.token_ids == expected.token_ids
    made = [e for e in events if e[0] == "made"]
    assert [i for _, i, _ in made] == [0, 1, 2]  # the prompt's: decode steps run the CPU's layers
    ran = [e[0] for e in events if e[0] != "made"]
    assert ran[:3] == ["ran offloaded"] * 3 and set(ran[3:]) == {"ran on the CPU"}
    assert max(n for *_, n in events) == OFFLOAD_COPIES == 2 and alive == set()
    # copy 2 is made once layer 0's copy was let go: after layer 0 ran
    assert events.index(made[2]) > [e[0] for e in events].index("ran offloaded")


def test_out_of_memory_first_makes_the_copies_one_at_a_time(path, monkeypatch):
    """runtime/prefill_oom.py with layers on the CPU: a prompt that runs out of GPU memory while
    two copies are made at once is read again with one at a time, before its passes shrink."""
    model = load(path, device=ACCEL, dtype=torch.float32, placement=Placement(ACCEL, 1, kv_type="f32"))
    ref = load(path, device=ACCEL, dtype=torch.float32, placement=Placement(ACCEL, 1, kv_type="f32"))
    warnings: list[str] = []
    model.on_warning = warnings.append
    real_layer = model.decoder._layer

    def layer(i, accel):
        if model.decoder.copy_ahead and i == 1:  # the second copy does not fit beside the first
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 142.00 MiB")
        return real_layer(i, accel)

    monkeypatch.setattr(model.decoder, "_layer", layer)
    assert model.decoder.copy_ahead and model.decoder.prefill_offload
    out = model.generate("Describe it.", [IMAGE], max_new_tokens=TOKENS)
    assert warnings == ["out of GPU memory reading the prompt; reading it again with the CPU layers' copies made "
                        "one at a time"]
    assert not model.decoder.copy_ahead and model.decoder.pass_share == 1
    assert out.token_ids == ref.generate("Describe it.", [IMAGE], max_new_tokens=TOKENS).token_ids


@pytest.mark.parametrize("kv_type", ["f32", "q8_0"])
def test_each_group_reads_the_cpu_cache_once_a_layer(path, monkeypatch, kv_type):
    """runtime/offload_kv.py: a prompt's passes through an offloaded layer read from the layer's
    CPU cache only the tokens cached before their group, once (a q8_0 cache also each pass's own
    tokens back, as it rounded them), not every key so far each pass; the hidden states and the
    cache are the CPU layers' (tolerances as above)."""
    monkeypatch.setattr(decoder_module, "OFFLOAD_GROUP", 24)  # passes of 8: three a group
    n = 60  # groups [0, 24), [24, 48) and [48, 60): its two passes through _group_forward too
    model = load(path, device=ACCEL, dtype=torch.float32, placement=Placement(ACCEL, 1, kv_type=kv_type))
    ref = load(path, device=ACCEL, dtype=torch.float32,
               placement=Placement(ACCEL, 1, kv_type=kv_type, prefill_offload=False))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, model.cfg.n_embd, generator=g)
    positions = torch.arange(n).expand(3, n)
    cache, ref_cache = model.decoder.new_cache(64, kv_type), ref.decoder.new_cache(64, kv_type)
    reads: list[tuple[int, int, int]] = []
    real_read = cache.read

    def read(layer, end, start=0):
        reads.append((layer, start, end))
        return real_read(layer, end, start)

    cache.read = read
    out = torch.cat(model.decoder.prompt_forward(x, positions, cache, chunk=8))
    want = torch.cat(ref.decoder.prompt_forward(x, positions, ref_cache, chunk=8))
    # (layer, start, end), sorted: layer 1's prefix is read on the copy worker while layer 0 runs
    want_reads = [(i, 0, base) for base in (0, 24, 48) for i in (0, 1)]
    if kv_type == "q8_0":
        want_reads += [(i, lo, min(lo + 8, n)) for lo in range(0, n, 8) for i in (0, 1)]
    assert sorted(reads) == sorted(want_reads)
    tol = 1e-4 if kv_type == "f32" else 5e-3
    assert cache.length == ref_cache.length == n
    assert (out - want).abs().max() <= tol * want.abs().max()
    for i in range(3):
        for mine, theirs in zip(real_read(i, n), ref_cache.read(i, n)):
            assert (mine.cpu() - theirs.cpu()).abs().max() <= 2 * tol * theirs.abs().max()


def test_offloaded_layers_attend_as_the_accelerators_own_in_bf16(path, monkeypatch):
    """bf16 products (the default): an offloaded copy attends over its mirror, bf16 (offload_kv.py),
    as a layer kept on the accelerator attends over its own cache, which kernels/attention.py
    converts to bf16 as it reads: the same numbers, so a prompt's hidden states and the CPU
    layers' caches are those of the model with every layer there (float32 caches on both)."""
    monkeypatch.setattr(decoder_module, "OFFLOAD_GROUP", 24)
    n = 60
    model = load(path, device=ACCEL, placement=Placement(ACCEL, 1, kv_type="f32"))
    whole = load(path, device=ACCEL, placement=Placement(ACCEL, 3, kv_type="f32"))
    assert model.decoder.attn_dtype == torch.bfloat16 and model.decoder.prefill_offload
    mirrors = []
    real_copy = model.decoder._offload_copy

    def offload_copy(span, i):
        copy = real_copy(span, i)
        mirrors.append(copy.kv.k.dtype)
        return copy

    monkeypatch.setattr(model.decoder, "_offload_copy", offload_copy)
    x = torch.randn(n, model.cfg.n_embd, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(n).expand(3, n)
    cache, whole_cache = model.decoder.new_cache(64, "f32"), whole.decoder.new_cache(64, "f32")
    out = torch.cat(model.decoder.prompt_forward(x, positions, cache, chunk=8))
    want = torch.cat(whole.decoder.prompt_forward(x, positions, whole_cache, chunk=8))
    assert mirrors == [torch.bfloat16] * 6  # two CPU layers, three groups
    assert (out - want).abs().max() <= 1e-6 * want.abs().max()
    for i in range(3):
        for mine, theirs in zip(cache.read(i, n), whole_cache.read(i, n)):
            assert (mine.cpu() - theirs.cpu()).abs().max() <= 1e-6 * theirs.abs().max()
