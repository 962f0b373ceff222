"""kernels/qgemv_q8.py (Q4_K / Q5_K / Q6_K GEMVs on int8 activations) in Triton's interpreter.

Tolerance table:
| check | tolerance | why |
| against qgemv_q8_ref | 1e-5 x max|y| | the same integer sums and scales; float32 products and another summation order |
| epilogues against the reference's y through torch | 1e-5 x max|out| | as above; SwiGLU and the norm in float32 |
| against the float GEMV (qgemv.py) | 2^-7 x sum_k |w_k| max|x| over rows | each x rounded to 1/254 of its block's max |x| |
| quantize_q8 codes and sums | exact | round half away from zero of x * 127 / max|x| in float32, as the reference |
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from interpret import ACCEL

from qvl.convert.quant import dequantize, quantize
from qvl.kernels.qgemv_q8 import qgemv_q8, qgemv_q8_ref, quantize_q8
from qvl.kernels.qmatmul import qmatmul
from qvl.kernels.rmsnorm import rmsnorm_ref

TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)


def _weights(n: int, k: int, seed: int, qtype: T = T.Q4_K) -> np.ndarray:
    return quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32), qtype)


def _x(k: int, seed: int) -> torch.Tensor:
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, :32] = 0  # an all-zero block: scale 0
    x[0, 32:64] *= 1e-3  # tiny values
    return x


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> bool:
    return (got.double() - ref.double()).abs().max().item() <= rel * ref.abs().max().item()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k,split,block_n", [(1, 256, None, 8), (19, 512, None, 16), (33, 768, 2, 8),
                                               (16, 1024, 3, 16), (5, 1280, 2, 8)])
def test_int8_gemv_matches_its_reference(qtype, n, k, split, block_n):
    raw = _weights(n, k, n + k, qtype)
    x = _x(k, k)
    y, normed = qgemv_q8(x.to(ACCEL), torch.from_numpy(raw).to(ACCEL), qtype, n, k, block_n=block_n, split_k=split)
    ref = qgemv_q8_ref(x, raw, qtype)
    assert y.shape == (1, n) and normed is None
    assert _close(y.cpu(), ref)
    # against the float GEMV: x's rounding only
    exact = qmatmul(x.to(ACCEL), torch.from_numpy(raw).to(ACCEL), qtype, n, k).cpu().double()
    w = np.abs(np.asarray(dequantize(raw, qtype), dtype=np.float64).reshape(n, k)).sum(axis=1)
    bound = 2 ** -7 * w * x.abs().max().item()
    assert ((y.cpu().double() - exact).abs()[0].numpy() <= bound).all()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("split", [1, 3])
def test_epilogues_fused(qtype, split):
    """Bias + residual, SwiGLU over stacked [gate; up] (rows interleaved per program), and the
    RMSNorm of the output, against the reference's product through torch."""
    n, k = 22, 768  # 11 SwiGLU outputs: the last program's row block is part padding
    raw = _weights(n, k, 11, qtype)
    x = _x(k, 4)
    g = torch.Generator().manual_seed(5)
    bias, res, w = torch.randn(n, generator=g), torch.randn(1, n, generator=g), torch.rand(n, generator=g) + 0.5
    dev = torch.from_numpy(raw).to(ACCEL)
    ref = qgemv_q8_ref(x, raw, qtype).float()

    y, normed = qgemv_q8(x.to(ACCEL), dev, qtype, n, k, bias.to(ACCEL), res.to(ACCEL), split_k=split,
                         norm_weight=w.to(ACCEL), norm_eps=1e-6)
    assert _close(y.cpu(), ref + bias + res)
    assert _close(normed.cpu(), rmsnorm_ref(ref + bias + res, w, 1e-6)[0])

    glu, _ = qgemv_q8(x.to(ACCEL), dev, qtype, n, k, swiglu=True, split_k=split)
    assert glu.shape == (1, n // 2)
    assert _close(glu.cpu(), F.silu(ref[:, :n // 2]) * ref[:, n // 2:])


def test_quantize_q8_blocks():
    x = torch.tensor([[0.5, -0.5, 1.0, -1.0] * 8, [0.0] * 32, [1e-30] + [0.0] * 31]).reshape(-1)
    out = quantize_q8(x.to(ACCEL))
    q, d, s, s16 = out.q.cpu(), out.d.cpu(), out.s.cpu(), out.s16.cpu()
    assert q[:4].tolist() == [64, -64, 127, -127]  # 63.5 rounds away from zero
    assert d[0].item() == pytest.approx(1 / 127) and d[1].item() == 0 and (q[32:64] == 0).all()
    assert s[0].item() == pytest.approx(d[0].item() * int(q[:32].sum()))
    assert q[64].item() == 127
    assert s16.tolist() == q.int().reshape(-1, 16).sum(dim=1).tolist()


def test_rejects_other_shapes_and_types():
    raw = torch.from_numpy(_weights(4, 256, 0))
    with pytest.raises(ValueError, match="qgemv_q8"):
        qgemv_q8(torch.zeros(2, 256), raw, T.Q4_K, 4, 256)
    with pytest.raises(ValueError, match="qgemv_q8"):
        qgemv_q8(torch.zeros(1, 300), raw, T.Q4_K, 4, 300)
    with pytest.raises(ValueError, match="Q8_0"):
        qgemv_q8(torch.zeros(1, 256), raw, T.Q8_0, 4, 256)


@pytest.mark.parametrize("qtype,wide_steps", [(T.Q4_K, 3), (T.Q5_K, 3), (T.Q6_K, 3), (T.Q6_K, 4)])
def test_rows_further_apart(qtype, wide_steps):
    """The first 2 steps of K of a wider weight (a view, rows further apart), as qmatmul passes
    them. Q6_K's 210-byte blocks: 3 steps a row leave rows 2-byte aligned only (two 16-bit loads
    a word), 4 steps 4-byte aligned (steps in pairs: 32-bit words, the odd step's shifted)."""
    raw = _weights(9, 256 * wide_steps, 5, qtype)
    step = raw.shape[1] // wide_steps
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(2))
    view = torch.from_numpy(raw).to(ACCEL)[:, :2 * step]
    y, _ = qgemv_q8(x.to(ACCEL), view, qtype, 9, 512, block_n=8)
    assert _close(y.cpu(), qgemv_q8_ref(x, np.ascontiguousarray(raw[:, :2 * step]), qtype))


def test_qmatmul_takes_it_when_asked(monkeypatch):
    """QVL_INT8_GEMV (q8_activations.ENABLED): batch-1 Q4_K, Q5_K and Q6_K products, their bias / residual /
    SwiGLU and the next RMSNorm, equal to qgemv_q8's own; Q8_0 and two rows of x stay on the
    float GEMV (equal results)."""
    import qvl.kernels.q8_activations as q8_activations
    import qvl.kernels.qmatmul as qm

    n, k = 24, 512
    g = torch.Generator().manual_seed(3)
    x, bias, res = torch.randn(1, k, generator=g), torch.randn(n, generator=g), torch.randn(1, n, generator=g)
    w = torch.rand(n, generator=g) + 0.5
    x, bias, res, w = (t.to(ACCEL) for t in (x, bias, res, w))
    raws = {qt: torch.from_numpy(_weights(n, k, 7, qt)).to(ACCEL) for qt in (*TYPES, T.Q8_0)}
    eight = qm.qmatmul(x, raws[T.Q8_0], T.Q8_0, n, k).cpu()
    monkeypatch.setattr(q8_activations, "ENABLED", True)
    for qt in TYPES:
        raw = raws[qt]
        assert torch.equal(qm.qmatmul(x, raw, qt, n, k, bias, res), qgemv_q8(x, raw, qt, n, k, bias, res)[0])
        assert torch.equal(qm.qmatmul(x, raw, qt, n, k, swiglu=True), qgemv_q8(x, raw, qt, n, k, swiglu=True)[0])
        assert torch.equal(qm.qmatmul_norm(x, raw, qt, n, k, w, 1e-6)[1],
                           qgemv_q8(x, raw, qt, n, k, norm_weight=w, norm_eps=1e-6)[1])
        assert not torch.equal(qm.qmatmul(x, raw, qt, n, k), qm.qgemv(x, raw, qt, n, k)[0])
        x2 = torch.cat([x, x])
        assert torch.equal(qm.qmatmul(x2, raw, qt, n, k), qm.qgemv(x2, raw, qt, n, k)[0])
    assert torch.equal(qm.qmatmul(x, raws[T.Q8_0], T.Q8_0, n, k).cpu(), eight)


def _same_as_quantized(y: torch.Tensor) -> None:
    """The int8 form remembered for y equals quantize_q8's of y: codes, scales and sums exact."""
    from qvl.kernels.q8_activations import recall

    kept = recall(y)
    assert kept is not None
    fresh = quantize_q8(y.reshape(-1))
    for a, b in zip((kept.q, kept.d, kept.s, kept.s16), (fresh.q, fresh.d, fresh.s, fresh.s16)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gemv,block_n,split", [("int8", 8, 1), ("int8", 4, 3), ("int8", 128, 2), ("float", 4, 2),
                                                ("float", 16, 1), ("float", 128, 3)])
def test_swiglu_writes_its_int8_form(gemv, block_n, split):
    """A SwiGLU GEMV (the down projection's x) with q8_out: its output's int8 form from the same
    launch, whether a program finishes 2, 4 or 8 of a 32-output block (the block's last program
    to arrive quantizes it) or 64 (each its own)."""
    from qvl.kernels.qgemv import qgemv

    n, k = 2 * 96, 512
    raw = torch.from_numpy(_weights(n, k, 12)).to(ACCEL)
    x = _x(k, 10).to(ACCEL)
    if gemv == "int8":
        y, _ = qgemv_q8(x, raw, T.Q4_K, n, k, swiglu=True, block_n=block_n, split_k=split, q8_out=True)
    else:
        y, _ = qgemv(x, raw, T.Q4_K, n, k, swiglu=True, block_n=block_n, split_k=split, q8_out=True)
    assert y.shape == (1, 96)
    _same_as_quantized(y)


@pytest.mark.parametrize("gemv", ["int8", "float"])
def test_norm_writes_its_int8_form(gemv, monkeypatch):
    """A GEMV whose norm feeds int8 GEMVs (q8_out) writes the norm's int8 form in the same
    launch: equal to quantize_q8 of the normed output (codes, scales and sums exact: the same
    float32 values), and the next int8 GEMV on it quantizes nothing."""
    import qvl.kernels.qgemv_q8 as q8
    from qvl.kernels.qgemv import qgemv

    n, k = 256, 512  # n: the next GEMV's K, a whole step
    raw = torch.from_numpy(_weights(n, k, 9)).to(ACCEL)
    x, w = _x(k, 8).to(ACCEL), (torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5).to(ACCEL)
    if gemv == "int8":
        _, normed = qgemv_q8(x, raw, T.Q4_K, n, k, norm_weight=w, norm_eps=1e-6, split_k=2, q8_out=True)
    else:
        _, normed = qgemv(x, raw, T.Q4_K, n, k, norm_weight=w, norm_eps=1e-6, split_k=2, q8_out=True)
    _same_as_quantized(normed)
    calls = []
    monkeypatch.setattr(q8, "quantize_q8", lambda *a: calls.append(1) or quantize_q8(*a))
    nxt = _weights(8, n, 3)
    y, _ = qgemv_q8(normed, torch.from_numpy(nxt).to(ACCEL), T.Q4_K, 8, n)
    assert not calls and _close(y.cpu(), qgemv_q8_ref(normed.cpu(), nxt, T.Q4_K))


def test_quantized_x_is_kept_while_unchanged(monkeypatch):
    """q8_activations.recall: one quantization of an x for several GEMVs (a layer's q/k stack and
    its Q6_K v), found from a view of the whole of x; none after x is written or for another
    tensor at the same values."""
    import qvl.kernels.qgemv_q8 as q8
    from qvl.kernels.q8_activations import recall

    calls = []
    real = q8.quantize_q8
    monkeypatch.setattr(q8, "quantize_q8", lambda *a: calls.append(1) or real(*a))
    raws = {qt: torch.from_numpy(_weights(8, 256, 4, qt)).to(ACCEL) for qt in TYPES}
    x = _x(256, 6).to(ACCEL)
    first = qgemv_q8(x, raws[T.Q4_K], T.Q4_K, 8, 256)[0]
    second = qgemv_q8(x.reshape(1, 256), raws[T.Q6_K], T.Q6_K, 8, 256)[0]
    assert len(calls) == 1 and recall(x.view(-1)) is not None
    assert recall(x[:, :128]) is None  # part of x: not its form
    assert _close(second.cpu(), qgemv_q8_ref(x.cpu(), raws[T.Q6_K].cpu().numpy(), T.Q6_K))
    x.mul_(2)  # written: quantized again, and the result follows
    again = qgemv_q8(x, raws[T.Q4_K], T.Q4_K, 8, 256)[0]
    assert len(calls) == 2 and _close(again.cpu(), 2 * first.cpu())
    qgemv_q8(x.clone(), raws[T.Q4_K], T.Q4_K, 8, 256)
    assert len(calls) == 3


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_attention_and_rmsnorm_write_their_int8_forms(splits):
    """Decode attention (the o projection's x; GQA 7, one KV head's 7 query heads a run of the
    output) and the step's first RMSNorm (the first q/k/v's x) with q8_out: their outputs' int8
    forms, exact; without it none is remembered."""
    from qvl.kernels.decode_attention import decode_attention
    from qvl.kernels.q8_activations import recall
    from qvl.kernels.rmsnorm import rmsnorm

    g = torch.Generator().manual_seed(splits)
    q = torch.randn(28, 128, generator=g)
    k, v = torch.randn(4, 64, 128, generator=g), torch.randn(4, 64, 128, generator=g)
    n = torch.tensor([50], dtype=torch.int32)
    out = decode_attention(q.to(ACCEL), k.to(ACCEL), v.to(ACCEL), n.to(ACCEL), splits=splits, q8_out=True)
    _same_as_quantized(out[None].reshape(1, -1))
    assert recall(decode_attention(q.to(ACCEL), k.to(ACCEL), v.to(ACCEL), n.to(ACCEL), splits=splits,
                                   q8_out=False)) is None
    x, w = torch.randn(1, 3584, generator=g).to(ACCEL), torch.rand(3584, generator=g).to(ACCEL)
    _same_as_quantized(rmsnorm(x, w, 1e-6, q8_out=True)[0])
    assert recall(rmsnorm(x, w, 1e-6, q8_out=False)[0]) is None
