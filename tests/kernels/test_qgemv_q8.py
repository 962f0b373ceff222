"""kernels/qgemv_q8.py (Q4_K GEMV on int8 activations, a prototype) in Triton's interpreter.

Tolerance table:
| check | tolerance | why |
| against qgemv_q8_ref | 1e-5 x max|y| | the same integer sums and scales; float32 products and another summation order |
| against the float GEMV (qgemv.py) | 2^-7 x sum_k |w_k| max|x| over rows | each x rounded to 1/254 of its block's max |x| |
| quantize_q8 codes | exact | round half away from zero of x * 127 / max|x| in float32, as the reference |
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from interpret import ACCEL

from qvl.convert.quant import dequantize, quantize
from qvl.kernels.qgemv_q8 import qgemv_q8, qgemv_q8_ref, quantize_q8
from qvl.kernels.qmatmul import qmatmul


def _weights(n: int, k: int, seed: int) -> np.ndarray:
    return quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32), T.Q4_K)


@pytest.mark.parametrize("n,k,split,block_n", [(1, 256, None, 8), (19, 512, None, 16), (33, 768, 2, 8),
                                               (16, 1024, 3, 16)])
def test_int8_gemv_matches_its_reference(n, k, split, block_n):
    raw = _weights(n, k, n + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g) * 3
    x[0, :32] = 0  # an all-zero block: scale 0
    x[0, 32:64] *= 1e-3  # tiny values
    y = qgemv_q8(x.to(ACCEL), torch.from_numpy(raw).to(ACCEL), n, k, block_n=block_n, split_k=split).cpu()
    ref = qgemv_q8_ref(x, raw)
    assert y.shape == (1, n)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # against the float GEMV: x's rounding only
    exact = qmatmul(x.to(ACCEL), torch.from_numpy(raw).to(ACCEL), T.Q4_K, n, k).cpu().double()
    w = np.abs(np.asarray(dequantize(raw, T.Q4_K), dtype=np.float64).reshape(n, k)).sum(axis=1)
    bound = 2 ** -7 * w * x.abs().max().item()
    assert ((y.double() - exact).abs()[0].numpy() <= bound).all()


def test_quantize_q8_blocks():
    x = torch.tensor([[0.5, -0.5, 1.0, -1.0] * 8, [0.0] * 32, [1e-30] + [0.0] * 31]).reshape(-1)
    q, d, s = quantize_q8(x.to(ACCEL))
    q, d, s = q.cpu(), d.cpu(), s.cpu()
    assert q[:4].tolist() == [64, -64, 127, -127]  # 63.5 rounds away from zero
    assert d[0].item() == pytest.approx(1 / 127) and d[1].item() == 0 and (q[32:64] == 0).all()
    assert s[0].item() == pytest.approx(d[0].item() * int(q[:32].sum()))
    assert q[64].item() == 127


def test_rejects_other_shapes():
    raw = torch.from_numpy(_weights(4, 256, 0))
    with pytest.raises(ValueError, match="qgemv_q8"):
        qgemv_q8(torch.zeros(2, 256), raw, 4, 256)
    with pytest.raises(ValueError, match="qgemv_q8"):
        qgemv_q8(torch.zeros(1, 300), raw, 4, 300)
