"""GGUF weight rows for kernel tests, quantized by our ggml-exact quantizers."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from qvl.convert.quant import quantize


def quant_weights(n: int, k: int, qtype: T, kind: str, seed: int) -> torch.Tensor:
    """(n, row_bytes) uint8 of N(0, 1) rows; `kind`: normal, zero-blocks (the first 256 columns
    zero), huge (x 3e4) or tiny (x 1e-5) scales."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind == "zero-blocks":
        w[:, :256] = 0
    elif kind == "huge":
        w *= 3e4
    elif kind == "tiny":
        w *= 1e-5
    return torch.from_numpy(quantize(w, qtype))
