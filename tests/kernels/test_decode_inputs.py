"""kernels/decode_inputs.py: embed_row against gguf-py's dequantization of the same row (interpreted).

Tolerance: exact (advance: the angles are the float32 product the host computes when it stages
a step). The kernel decodes each weight with the GEMMs' expressions (float32 scale x
code, as gguf-py) or widens F16 / BF16 / F32; no sums.
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from interpret import ACCEL

from qvl.convert.quant import quantize
from qvl.kernels.decode_inputs import advance, embed_row, embed_row_ref, supported
from qvl.runtime.decoder import rope_tables
from quant_weights import random_grid_blocks


def _table(qtype: T, rows: int, cols: int) -> np.ndarray:
    w = np.random.default_rng(rows + cols).standard_normal((rows, cols)).astype(np.float32)
    if qtype == T.F32:
        return w.view(np.uint8)
    if qtype == T.F16:
        return w.astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    if qtype in (T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_0, T.Q5_K, T.Q4_0):
        return quantize(w, qtype)
    return random_grid_blocks(rows, cols, qtype, np.random.default_rng(rows))


@pytest.mark.parametrize("qtype,cols", [(T.Q4_K, 512), (T.Q6_K, 768), (T.Q8_0, 64), (T.Q8_0, 288), (T.Q5_0, 96),
                                        (T.Q5_K, 256), (T.IQ2_XXS, 256), (T.F16, 80), (T.BF16, 130),
                                        (T.F32, 64)], ids=str)
@pytest.mark.parametrize("token", [0, 6, 10])  # first, middle, last row
def test_row_by_device_token(qtype, cols, token):
    raw = _table(qtype, 11, cols)
    assert supported(qtype)
    out = torch.full((1, cols), float("nan"), device=ACCEL)
    embed_row(torch.from_numpy(raw).to(ACCEL), qtype, cols, torch.tensor([token], device=ACCEL), out)
    assert torch.equal(out.cpu()[0], embed_row_ref(raw, qtype, token))


def test_advance_moves_the_step_on():
    """advance: the argmax becomes the token, slot / length / position move on by one, and the
    angles are (position + 1) * inv_freq exactly as the host computes them (float(p) * inv_freq)."""
    inv_freq = rope_tables(128, 1e6, (16, 24, 24))[0]
    dev = torch.device(ACCEL)
    token, slot = torch.tensor([7], device=dev), torch.tensor([41], device=dev)
    length, pos = torch.tensor([42], dtype=torch.int32, device=dev), torch.tensor([1500.0], device=dev)
    angles = torch.zeros(64, device=dev)
    advance(torch.tensor([151643], device=dev), token, slot, length, pos, inv_freq.to(dev), angles)
    assert (token.item(), slot.item(), length.item(), pos.item()) == (151643, 42, 43, 1501.0)
    assert torch.equal(angles.cpu(), float(1501) * inv_freq)
