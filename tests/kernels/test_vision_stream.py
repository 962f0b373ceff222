"""runtime/vision_stream.py: the vision tower with its blocks' matrices in host memory, copied
to the accelerator a block ahead, against the same tower held there whole. The CPU stands in
for the accelerator (the Triton kernels in the interpreter; on a GPU machine the tests run on
it, page-locked memory and the copy stream included).

Tolerance: none, the outputs are equal. The same kernels run on the same bytes; only where the
bytes live between blocks differs.
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import numpy as np
import pytest
import torch
from interpret import ACCEL

from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.vision import VisionTower, vision_config
from qvl.runtime.vision_stream import block_weights
from qvl.runtime.weights import EXACT, STREAMED, Weights

DEVICE = torch.device(ACCEL, 0) if ACCEL == "cuda" else torch.device(ACCEL)


def _pixels(tower: VisionTower, grid: list[tuple[int, int, int]]) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grid)
    return torch.from_numpy(np.random.default_rng(0).standard_normal((n, tower.patch.shape[1]), dtype=np.float32))


def _storage_bytes(block, largest: bool = False) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in block_weights(block)}
    sizes = [s.nbytes() for s in storages.values()]
    return max(sizes) if largest else sum(sizes)


def _where(stream, i: int) -> str:
    """What block i's matrices view: the placeholder blocks at rest share, or their own device
    copies (the CPU stands in for the device here, so by address)."""
    parts = stream._parts[i]
    ptrs = {t.untyped_storage().data_ptr() for s in parts for t in s.tensors}
    if ptrs == {stream._rest.data_ptr()}:
        return "rest"
    if all(s.gpu is not None for s in parts) and ptrs == {s.gpu.data_ptr() for s in parts}:
        return "device"
    return "mixed"


@pytest.mark.parametrize("model,kernels", [("tiny-qwen2.5-vl", True), ("tiny-qwen2.5-vl", False),
                                           ("tiny-qwen2-vl", False)])
def test_streamed_tower_equals_the_resident_one(fixtures_dir, model, kernels, monkeypatch):
    """Outputs equal; during the run at most two blocks' matrices on the device (the one
    running and the next, copying); none before or after, and the resident tower's matrices
    are where the streamed one's are only while they run."""
    path = fixtures_dir / model / "llamacpp" / f"mmproj-{model}-f16.gguf"
    with GGUFFile(path) as g:
        cfg = vision_config(g)
        mode = STREAMED if kernels else EXACT
        whole = VisionTower(cfg, Weights(g, mode=mode), DEVICE, kernels)
        streamed = VisionTower(cfg, Weights(g, mode=mode), DEVICE, kernels, stream=True)
        stream = streamed.stream
        assert stream is not None and stream.resident() == []
        assert [_where(stream, i) for i in range(len(streamed.blocks))] == ["rest"] * len(streamed.blocks)
        assert stream.host_bytes == sum(_storage_bytes(b) for b in whole.blocks)
        assert stream.placeholder_bytes == max(_storage_bytes(b, largest=True) for b in whole.blocks)
        seen = []
        real = streamed._attention

        def attention(b, x, rot, cu):
            i = next(j for j, blk in enumerate(streamed.blocks) if blk is b)
            seen.append(stream.resident())
            assert _where(stream, i) == "device"
            return real(b, x, rot, cu)

        monkeypatch.setattr(streamed, "_attention", attention)
        grid = [(1, 8, 12), (1, 4, 4)]
        pixels = _pixels(whole, grid)
        y, ref = streamed.forward(pixels, grid), whole.forward(pixels, grid)
        assert torch.equal(y.cpu(), ref.cpu())
        depth = len(streamed.blocks)
        assert seen == [[i, i + 1] if i + 1 < depth else [i] for i in range(depth)]
        assert stream.resident() == [] and _where(stream, depth - 1) == "rest"
        assert torch.equal(streamed.forward(pixels, grid).cpu(), ref.cpu())  # and again, from host memory


def test_a_failed_run_leaves_no_block_on_the_device(fixtures_dir, monkeypatch):
    path = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "mmproj-tiny-qwen2.5-vl-f16.gguf"
    with GGUFFile(path) as g:
        tower = VisionTower(vision_config(g), Weights(g, mode=EXACT), DEVICE, False, stream=True)
        calls = []

        def failing(b, x):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("out of memory")
            return real(b, x)

        real = tower._mlp
        monkeypatch.setattr(tower, "_mlp", failing)
        grid = [(1, 4, 4)]
        with pytest.raises(RuntimeError, match="out of memory"):
            tower.forward(_pixels(tower, grid), grid)
        assert tower.stream.resident() == []


def test_streaming_needs_an_accelerator(fixtures_dir):
    path = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "mmproj-tiny-qwen2.5-vl-f16.gguf"
    with GGUFFile(path) as g:
        with pytest.raises(ValueError, match="accelerator"):
            VisionTower(vision_config(g), Weights(g, mode=EXACT), None, stream=True)
