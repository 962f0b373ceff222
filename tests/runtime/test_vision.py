"""The vision tower's CPU fast path (STREAMED: F16 weights multiplied as bf16, the MLP's hidden
layer kept in bf16, biases added by the GEMM) against its float32 path (EXACT) on llama.cpp's
F16 mmproj files of the shared fixtures (Qwen2.5-VL: SwiGLU, RMSNorm, window attention;
Qwen2-VL: quick GELU, LayerNorm).

Tolerances, of the largest output: the tower 2e-2, one block's MLP 1.5e-2. Each product rounds
its activations, weights and output to bf16 (2^-9 each, about 6e-3 worst case together); the
hidden layer adds two roundings (silu, the product with up). Measured: tower 4.0e-3 / 4.3e-3,
MLPs 4e-3 to 6.3e-3. The MLP check is the sharp one: the MLPs without their up and gate biases
are 4.4e-2 to 6.6e-2 off (the tower only 6.5e-3 / 7.7e-3, its residual stream dominates).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.vision import VisionTower, vision_config
from qvl.runtime.weights import EXACT, STREAMED, Weights


@pytest.mark.parametrize("model", ["tiny-qwen2.5-vl", "tiny-qwen2-vl"])
def test_streamed_tower_matches_float32(fixtures_dir, model, cpu_gemms):
    """STREAMED weights in the CPU's GEMM type: bf16 within 2e-2 of float32, or float32 itself
    (cpu_gemm.py) within float32 rounding of the EXACT path's slice-by-slice products."""
    half = torch.bfloat16 if cpu_gemms == "bf16" else torch.float32
    path = fixtures_dir / model / "llamacpp" / f"mmproj-{model}-f16.gguf"
    with GGUFFile(path) as g:
        cfg = vision_config(g)
        fast, exact = VisionTower(cfg, Weights(g, mode=STREAMED)), VisionTower(cfg, Weights(g, mode=EXACT))
        grid = [(1, 8, 12), (1, 4, 4)]  # two images: windows of unequal size
        n = sum(t * h * w for t, h, w in grid)
        pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((n, fast.patch.shape[1]), dtype=np.float32))
        y, ref = fast.forward(pixels, grid), exact.forward(pixels, grid)
        assert y.dtype == torch.float32 and y.shape == ref.shape == (n // 4, ref.shape[1])
        err = (y - ref).abs().max().item() / ref.abs().max().item()
        if cpu_gemms == "bf16":
            assert 0 < err <= 2e-2, err  # > 0: the fast path did run in bf16
        else:
            assert err <= 1e-5, err
        x = torch.randn(50, cfg.embed_dim, generator=torch.Generator().manual_seed(0))
        for block, block_ref in zip(fast.blocks, exact.blocks):
            assert block.up.linear(x, block.up_b).dtype == half
            assert block_ref.up.linear(x, block_ref.up_b).dtype == torch.float32
            mlp, mlp_ref = fast._mlp(block, x), exact._mlp(block_ref, x)
            assert (mlp - mlp_ref).abs().max().item() <= 1.5e-2 * mlp_ref.abs().max().item()


def test_linear_adds_the_bias_in_the_gemm(fixtures_dir, cpu_gemms):
    path = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "mmproj-tiny-qwen2.5-vl-f16.gguf"
    with GGUFFile(path) as g:
        name = "v.blk.0.ffn_up.weight"
        bias = Weights(g).vector("v.blk.0.ffn_up.bias")
        x = torch.randn(7, g.tensors[name].shape[1])
        exact = Weights(g, mode=EXACT).matrix(name)
        assert torch.equal(exact.linear(x, bias), exact.matmul(x, bias))
        y = Weights(g, mode=STREAMED).matrix(name).linear(x, bias)
        ref = exact.matmul(x, bias)
        scale = x.abs() @ exact.rows_f32(0, exact.rows).abs().T + bias.abs()
        assert y.dtype == (torch.bfloat16 if cpu_gemms == "bf16" else torch.float32)
        assert ((y.float() - ref).abs() / scale).max().item() <= 3 * 2**-9
