"""kernels/dequant.py: GGUF rows decoded by Triton against gguf-py's dequantization, and the
dequantize-then-matmul route qmatmul takes for float16 prefill on sm_75, and for bf16 / float16
prefill on later GPUs with QVL_DEQUANT_GEMM=1 (pretended here).

Tolerance table:
| what | tolerance | why |
| dequant, float32 | 1e-6 of max |w| | the same products (d * scale * q - dmin * m), fused or not |
| dequant, float16 | 2^-11 rel. + 2^-24 | float32 rounded to nearest float16: half a unit; inf past 65504 |
| sm_75 route | 1e-2 of max |y| | weights and x rounded to float16 (2^-11 each); as the bf16 GEMM's |
| QVL_DEQUANT_GEMM route, bf16 | 2e-2 of max |y| | weights and x rounded to bf16 (2^-8 each), and here (the CPU's matmul, no out_dtype) the product too |
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from interpret import ACCEL
from quant_weights import quant_weights

import qvl.kernels.dequant as dequant_module
from qvl.kernels.dequant import dequant, dequant_ref
from qvl.kernels.qmatmul import qmatmul, qmatmul_ref
from qvl.kernels.target import Target, pretending
from qvl.runtime.iq_grids import GRID_TYPES

TYPES = [T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_0, T.Q4_0, T.Q5_K, T.Q4_1, T.Q5_1, T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, *GRID_TYPES]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # "huge" in float16
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n,k,kind", [(1, 256, "normal"), (33, 512, "zero-blocks"), (40, 768, "huge"),
                                      (7, 256, "tiny")])
def test_dequant_matches_gguf(qtype, n, k, kind):
    raw = quant_weights(n, k, qtype, kind, seed=n + k)
    ref = dequant_ref(raw, qtype)
    raw = raw.to(ACCEL)
    got = dequant(raw, qtype, n, k, torch.float32).cpu()
    assert got.shape == (n, k)
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    half = dequant(raw, qtype, n, k, torch.float16).float().cpu()
    big = torch.isinf(ref.half())  # "huge": beyond float16's 65504, infinite as torch's .half() makes it
    assert torch.equal(torch.isinf(half), big)
    assert ((half - ref).abs() <= ref.abs() * 2 ** -11 + 2 ** -24)[~big].all()


ROUTES = {  # name: (the GPU pretended, x's type, QVL_DEQUANT_GEMM, tolerance of max |y|: the table above)
    "sm75-float16": (Target(75, 1), torch.float16, False, 1e-2),
    "sm90-bf16-asked": (Target(90, 132), torch.bfloat16, True, 2e-2),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_prefill_goes_through_dequant(qtype, route, monkeypatch):
    """On a (pretended) sm_75 float16 x with M > 8, and on sm_90 bf16 x with QVL_DEQUANT_GEMM=1,
    takes dequant_matmul, a slab of rows at a time (SLAB_ELEMENTS shrunk to make three slabs,
    the last one short), float32 out, the epilogue after it."""
    gpu, dtype, asked, tol = ROUTES[route]
    n, k, m = 40, 512, 11
    raw = quant_weights(n, k, qtype, "normal", seed=5)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((m, k)).astype(np.float32))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    calls = []
    matmul = dequant_module.dequant_matmul
    monkeypatch.setattr(dequant_module, "ON_TENSOR_CORES", asked)
    monkeypatch.setattr(dequant_module, "dequant_matmul", lambda *a: calls.append(a[3]) or matmul(*a))
    monkeypatch.setattr(dequant_module, "SLAB_ELEMENTS", 16 * k)  # 16 rows a slab: 16, 16, 8
    with pretending(gpu):
        got = qmatmul(x.to(ACCEL, dtype), raw.to(ACCEL), qtype, n, k, bias=bias.to(ACCEL)).cpu()
    assert calls == [n] and got.dtype == torch.float32
    ref = qmatmul_ref(x, raw, qtype) + bias
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_other_gpus_and_float32_keep_the_tiled_gemm(monkeypatch):
    raw = quant_weights(16, 256, T.Q4_K, "normal", seed=0)
    x = torch.randn(9, 256)
    monkeypatch.setattr(dequant_module, "dequant_matmul", lambda *a: pytest.fail("dequant route taken"))
    monkeypatch.setattr(dequant_module, "ON_TENSOR_CORES", False)
    for gpu, dtype in ((Target(75, 1), torch.float32), (Target(80, 1), torch.float16),
                       (Target(90, 132), torch.bfloat16)):
        with pretending(gpu):
            got = qmatmul(x.to(ACCEL, dtype), raw.to(ACCEL), T.Q4_K, 16, 256).cpu()
        ref = qmatmul_ref(x, raw, T.Q4_K)
        assert (got - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


def test_which_gemms_take_the_dequant_route(monkeypatch):
    """sm_75: float16 only; later GPUs: bf16 and float16 with QVL_DEQUANT_GEMM=1 only; float32
    and the interpreter never."""
    from qvl.kernels.target import INTERPRETER

    takes = dequant_module.takes_dequant
    monkeypatch.setattr(dequant_module, "ON_TENSOR_CORES", False)
    assert takes(Target(75, 40), torch.float16) and not takes(Target(75, 40), torch.bfloat16)
    assert not any(takes(Target(90, 132), d) for d in (torch.float16, torch.bfloat16, torch.float32))
    monkeypatch.setattr(dequant_module, "ON_TENSOR_CORES", True)
    assert takes(Target(90, 132), torch.bfloat16) and takes(Target(80, 108), torch.float16)
    assert not takes(Target(90, 132), torch.float32) and not takes(INTERPRETER, torch.bfloat16)
