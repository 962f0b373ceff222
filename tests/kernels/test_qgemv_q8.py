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


def test_rows_further_apart():
    """The first K columns of a wider weight (a view, rows further apart), as qmatmul passes them."""
    raw = _weights(9, 512, 5)
    wide = torch.from_numpy(np.concatenate([raw, raw[:, :144]], axis=1))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2))
    view = wide.to(ACCEL)[:, :144]
    y = qgemv_q8(x.to(ACCEL), view, 9, 256, block_n=8).cpu()
    ref = qgemv_q8_ref(x, np.ascontiguousarray(raw[:, :144]))
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_qmatmul_takes_it_when_asked(monkeypatch):
    """QVL_INT8_GEMV (qmatmul.INT8_GEMV): batch-1 Q4_K products, their bias / residual / SwiGLU
    and the next RMSNorm, against the float GEMV within x's rounding (table: 2^-7 of
    sum |w| max |x|; SwiGLU and the norm rescale it, checked at 2^-4 of max |y|); Q6_K and two
    rows of x stay on the float GEMV (equal results)."""
    import qvl.kernels.qmatmul as qm

    n, k = 24, 512
    raw = torch.from_numpy(_weights(n, k, 7)).to(ACCEL)
    g = torch.Generator().manual_seed(3)
    x, bias, res = torch.randn(1, k, generator=g), torch.randn(n, generator=g), torch.randn(1, n, generator=g)
    w = torch.rand(n, generator=g) + 0.5
    x = x.to(ACCEL)
    plain = [qm.qmatmul(x, raw, T.Q4_K, n, k, bias.to(ACCEL), res.to(ACCEL)).cpu(),
             qm.qmatmul(x, raw, T.Q4_K, n, k, swiglu=True).cpu(),
             qm.qmatmul_norm(x, raw, T.Q4_K, n, k, w.to(ACCEL), 1e-6)[1].cpu()]
    six = torch.from_numpy(quantize(np.random.default_rng(1).standard_normal((n, k)).astype(np.float32), T.Q6_K))
    six_plain = qm.qmatmul(x, six.to(ACCEL), T.Q6_K, n, k).cpu()
    monkeypatch.setattr(qm, "INT8_GEMV", True)
    got = [qm.qmatmul(x, raw, T.Q4_K, n, k, bias.to(ACCEL), res.to(ACCEL)).cpu(),
           qm.qmatmul(x, raw, T.Q4_K, n, k, swiglu=True).cpu(),
           qm.qmatmul_norm(x, raw, T.Q4_K, n, k, w.to(ACCEL), 1e-6)[1].cpu()]
    wsum = np.abs(np.asarray(dequantize(raw.cpu().numpy(), T.Q4_K)).reshape(n, k)).sum(axis=1)
    bound = torch.from_numpy(2 ** -7 * wsum * x.abs().max().item()).float()
    assert ((got[0] - plain[0]).abs()[0] <= bound).all() and not torch.equal(got[0], plain[0])
    for a, b in zip(got[1:], plain[1:]):
        assert (a - b).abs().max().item() <= 2 ** -4 * b.abs().max().item()
    assert torch.equal(qm.qmatmul(x, six.to(ACCEL), T.Q6_K, n, k).cpu(), six_plain)
    x2 = torch.cat([x, x])
    assert torch.equal(qm.qmatmul(x2, raw, T.Q4_K, n, k).cpu()[:1], qm.qgemv(x2, raw, T.Q4_K, n, k)[0].cpu()[:1])
