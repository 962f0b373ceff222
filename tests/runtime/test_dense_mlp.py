"""runtime/dense_mlp.py: the vision MLP over zero-padded, 16-byte-aligned GEMMs against the
three weights multiplied alone (Matrix.linear / matmul, as VisionTower._mlp does without it).

Tolerances: float32 copies 1e-5 of max |y| (the same products; only the GEMMs' blocking and so
the summation order may differ with K = 3424 instead of 3420); bf16 copies 2e-2 of max |y|
(the hidden layer rounded to bf16 in both, but once in another place: the unpadded path rounds
gate and up, then silu(gate) * up, each to bf16, as this one does; the down product's bf16
output against a float32 one, 2^-9 relative, and accumulation order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from qvl.runtime.dense_mlp import ALIGN, DenseMLP
from qvl.runtime.gguf_file import TensorInfo
from qvl.runtime.weights import Matrix

COLS, INTER = 40, 3420 // 20  # 171 hidden units: not a multiple of ALIGN, as the 7B's 3420


def _mats(dtype: torch.dtype, qtype: T = T.F16) -> tuple[list[Matrix], list[torch.Tensor]]:
    rng = np.random.default_rng(3)
    shapes = {"gate": (INTER, COLS), "up": (INTER, COLS), "down": (COLS, INTER)}
    mats, biases = [], []
    for name, (rows, cols) in shapes.items():
        a = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        raw = a.astype(np.float16).view(np.uint8) if qtype == T.F16 else a.view(np.uint8)
        m = Matrix(TensorInfo(name, qtype, (cols, rows), 0, raw.nbytes), raw)
        mats.append(m.to_device("cpu", True, dtype))
        biases.append(torch.from_numpy(rng.standard_normal(rows).astype(np.float32)))
    return mats, biases


def _alone(mats: list[Matrix], biases: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    gate, up, down = mats
    return down.matmul(F.silu(gate.linear(x, biases[0])) * up.linear(x, biases[1]), biases[2]).float()


@pytest.mark.parametrize("dtype,qtype,tol", [(torch.float32, T.F32, 1e-5), (torch.bfloat16, T.F16, 2e-2)])
@pytest.mark.parametrize("n", [1, 37])
def test_padded_mlp_is_the_mlp(dtype, qtype, tol, n):
    x = torch.from_numpy(np.random.default_rng(n).standard_normal((n, COLS)).astype(np.float32))
    ref_mats, biases = _mats(dtype, qtype)
    ref = _alone(ref_mats, biases, x)
    mats, _ = _mats(dtype, qtype)
    assert DenseMLP.supports(*mats)
    mlp = DenseMLP(*mats, *biases)
    assert mlp.width % ALIGN == 0 and mlp.width > INTER and mlp.gate_up.shape == (2 * mlp.width, COLS)
    assert mlp.down.shape == (COLS, mlp.width) and (mlp.down[:, INTER:] == 0).all()
    got = mlp.forward(x)
    assert got.dtype == dtype and got.shape == (n, COLS)
    assert (got.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    # the Matrix copies are views into the padded weights (no second copy), and still multiply alone
    assert mats[1]._device_dense.data_ptr() == mlp.gate_up.data_ptr() + mlp.width * COLS * mlp.gate_up.element_size()
    assert mats[2]._device_dense.data_ptr() == mlp.down.data_ptr()
    assert (_alone(mats, biases, x) - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_needs_dense_copies_and_a_gate():
    mats, _ = _mats(torch.float32, T.F32)
    assert not DenseMLP.supports(None, mats[1], mats[2])  # Qwen2-VL's MLP: no gate
    host = Matrix(TensorInfo("up", T.F32, (COLS, INTER), 0, 0), np.zeros((INTER, COLS), np.float32).view(np.uint8))
    assert not DenseMLP.supports(mats[0], host, mats[2])  # a weight with no accelerator copy
