"""The activations placement.py plans for, against what a forward pass holds: every tensor it
makes, counted from its allocation until its storage is freed (views and in-place results add
nothing), on the kernel path (the Triton kernels in the interpreter; on a GPU machine on the
GPU, where the image's copy up counts too) and on the torch path.

- The vision encode (`vision_bytes_per_pixel`). The towers are tiny but shaped like the real
  ones where it matters: the MLP is wider than the image's patches (Qwen2.5-VL 7B: 1280 -> 3420,
  here 128 -> 2044; Qwen2-VL's MLP ratio is 2 in the tiny models, so its width is 384), so that
  the MLP's phase sets the peak, as it does at full size.
- A prompt's pass through a decoder layer (`decoder_activation_bytes`), with its last token's
  logits; the MLP four times as wide as the layer, as the 7B's 5.3.

Bounds: the measured peak is at most the plan's estimate (an estimate below it would let a
planned image or prompt run out of memory); on the kernel path it is at least 1 / 1.6 of it
(the vision estimate's VISION_SLACK of 1.25 over its own count, and what the count rounds up:
an estimate that far over downscales images that fit, as the float32 formula did: 366 bytes a
pixel for the 7B's tower against ~123 counted).
"""

from __future__ import annotations

import dataclasses
import gc
import weakref

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from interpret import ACCEL
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.model import ALL_LAYERS
from qvl.runtime.loader import load
from qvl.runtime.placement import PATCH_PIXELS, Placement, decoder_activation_bytes, vision_bytes_per_pixel
from qvl.runtime.vision import VisionTower, vision_config
from qvl.runtime.weights import STREAMED, Weights
from tiny_models import TinySpec, make_checkpoint, to_gguf

DEVICE = torch.device(ACCEL, 0) if ACCEL == "cuda" else torch.device(ACCEL)
SPECS = {
    "qwen2_5_vl": TinySpec(hidden=64, intermediate=128, layers=1, vision_hidden=128, vision_width=2044,
                           vision_heads=2, vision_depth=2, dtype=torch.float32),
    "qwen2_vl": TinySpec(family="qwen2_vl", hidden=64, intermediate=128, layers=1, vision_hidden=384,
                         vision_heads=4, vision_depth=2, dtype=torch.float32),
}
GRID = [(1, 8, 12), (1, 4, 6)]  # two images: a window of 8 x 8 patches and a part of one, and a small one


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors made while active and not yet freed, and their peak. A result
    sharing storage with an input (a view, an in-place op, out=) is not new."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        seen = set()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in given or storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, storage.nbytes())
        if self.live > self.peak:
            # Triton's interpreter leaves a launch's arguments in reference cycles (numpy views
            # of them in its own objects) until a collection; no GPU launch keeps them
            gc.collect()
            self.peak = max(self.peak, self.live)
        return out


@pytest.fixture(scope="module")
def mmprojs(tmp_path_factory):
    out = {}
    for family, spec in SPECS.items():
        root = tmp_path_factory.mktemp(family)
        src = make_checkpoint(root / "ckpt", spec)
        to_gguf(src, root / "m.gguf", "f16", "f16")
        out[family] = root / "mmproj-m.gguf"
    return out


@pytest.mark.parametrize("family", SPECS)
@pytest.mark.parametrize("kernels", [True, False])
def test_an_encode_holds_at_most_the_planned_peak(mmprojs, family, kernels):
    with GGUFFile(mmprojs[family]) as g:
        tower = VisionTower(vision_config(g), Weights(g, mode=STREAMED), DEVICE, kernels)
        n = sum(t * h * w for t, h, w in GRID)
        pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((n, tower.patch.shape[1]),
                                                                           dtype=np.float32))
        tower.forward(pixels, GRID)  # first calls: caches made once (rotary tables, compiled kernels)
        counter = LiveBytes()
        with counter:
            y = tower.forward(pixels, GRID)
        del y
        gc.collect()
        assert counter.live == 0  # what the encode made is freed with its output
        planned = vision_bytes_per_pixel(g.tensors, kernels=kernels, half=True) * n * PATCH_PIXELS
        measured = counter.peak
        print(f"\n{family} kernels={kernels}: peak {measured / n:.0f} bytes a patch, planned {planned / n:.0f}")
        assert measured <= planned
        if kernels:
            assert planned <= 1.6 * measured


def test_the_float32_estimate_stays_for_what_the_half_count_does_not_cover(mmprojs):
    """Quantized tower matrices and float32 products keep the float32 formula; the torch path too."""
    with GGUFFile(mmprojs["qwen2_5_vl"]) as g:
        tensors = dict(g.tensors)
    half = vision_bytes_per_pixel(tensors, kernels=True, half=True)
    e, f = SPECS["qwen2_5_vl"].vision_hidden, SPECS["qwen2_5_vl"].vision_width
    float32 = 4 * (6 * e + 3 * f) / PATCH_PIXELS
    assert vision_bytes_per_pixel(tensors, kernels=True, half=False) == float32
    assert vision_bytes_per_pixel(tensors, kernels=False, half=True) == float32
    up = tensors["v.blk.0.ffn_up.weight"]  # Q8_0 in rows of 256, which the kernels read as blocks
    tensors["v.blk.0.ffn_up.weight"] = dataclasses.replace(up, type=GGMLQuantizationType.Q8_0, ne=(256, up.shape[0]),
                                                           nbytes=up.shape[0] * 256 // 32 * 34)
    assert vision_bytes_per_pixel(tensors, kernels=True, half=True) == float32
    assert half < 0.5 * float32  # 0.44 at these widths, 0.43 at the 7B's (test_placement)


@pytest.fixture(scope="module")
def decoder_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    spec = TinySpec(hidden=256, intermediate=1024, heads=4, kv_heads=2, layers=1, vocab_size=1280,
                    dtype=torch.float32)
    return to_gguf(make_checkpoint(root / "ckpt", spec), root / "m.gguf", "q8_0", "f16")


@pytest.mark.parametrize("kernels", [True, False])
def test_a_prompt_pass_holds_at_most_the_planned_activations(decoder_model, kernels):
    """64 tokens (the plan counts PREFILL_CHUNK's 512 the same way, a token at a time) through
    the layer, and the last token's logits. Before the SwiGLU was written over the gate's
    product and the attention's tensors let go before the MLP, the kernel path held 23,168
    bytes a token here, over the plan's 20,640."""
    model = load(decoder_model, device=ACCEL, placement=Placement(ACCEL, ALL_LAYERS, kernels=kernels))
    decoder, tokens = model.decoder, 64
    x = torch.randn(tokens, decoder.cfg.n_embd, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    positions = torch.arange(tokens)[None].expand(3, tokens).contiguous()
    for _ in range(2):  # the first: caches made once (rotary tables, compiled kernels)
        cache = decoder.new_cache(tokens)
        counter = LiveBytes()
        with counter:
            logits = decoder.logits(decoder.forward(x, positions, cache)[-1:])
    del logits
    gc.collect()
    assert counter.live == 0
    planned = decoder_activation_bytes(decoder.cfg, tokens)
    print(f"\nkernels={kernels}: peak {counter.peak / tokens:.0f} bytes a token, planned {planned / tokens:.0f}")
    assert counter.peak <= planned
    if kernels:
        assert planned <= 1.6 * counter.peak
