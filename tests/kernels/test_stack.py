"""runtime/stack.py: q/k/v and gate/up stacked into one kernel launch where they share a GGUF type,
against each weight multiplied alone on the torch path.

Tolerance: 1e-5 of max |y|, both sides float32 products of the same dequantized blocks; only the
summation order differs (K = 512: ~K * 2^-24 relative).
"""

from __future__ import annotations

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
from interpret import ACCEL

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qvl.convert.quant import quantize
from qvl.runtime.gguf_file import TensorInfo
from qvl.runtime.stack import Stack
from qvl.runtime.weights import DeviceBlocks, Matrix

K = 512
RTOL = 1e-5


def _matrix(name: str, rows: int, qtype: T, seed: int) -> Matrix:
    w = np.random.default_rng(seed).standard_normal((rows, K)).astype(np.float32)
    raw = quantize(w, qtype)
    return Matrix(TensorInfo(name, qtype, (K, rows), 0, raw.nbytes), raw)


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return got.shape == ref.shape and (got.cpu() - ref).abs().max().item() <= RTOL * ref.abs().max().item()


@pytest.mark.parametrize("m", [1, 3, 11])  # GEMV (fused epilogue), GEMV in 2+ rows, GEMM
@pytest.mark.parametrize("v_type,groups", [(T.Q4_K, 1), (T.Q6_K, 2)])  # Q4_K_M gives some layers' v Q6_K
def test_qkv_stack_matches_separate_matmuls(m, v_type, groups):
    types = (T.Q4_K, T.Q4_K, v_type)
    rows = (64, 32, 32)
    cpu = [_matrix(n, r, t, i) for i, (n, r, t) in enumerate(zip("qkv", rows, types))]
    dev = [_matrix(n, r, t, i).to_device(ACCEL, True, torch.float32)
           for i, (n, r, t) in enumerate(zip("qkv", rows, types))]
    rng = np.random.default_rng(m)
    biases = [torch.from_numpy(rng.standard_normal(r).astype(np.float32)) for r in rows]
    x = torch.from_numpy(rng.standard_normal((m, K)).astype(np.float32))
    stack = Stack(dev, [b.to(ACCEL) for b in biases])
    assert len(stack.groups) == groups
    got = stack.matmul(x.to(ACCEL))
    for g, mat, b in zip(got, cpu, biases):
        assert _close(g, mat.matmul(x) + b)
    # each weight still multiplies alone, from a view into the stacked rows
    first = stack.groups[0][0]
    assert isinstance(first, DeviceBlocks)
    base = first.raw.data_ptr()
    assert dev[1].kernel is not None and dev[1].kernel.raw.data_ptr() == base + 64 * first.raw.shape[1]
    assert _close(dev[1].matmul(x.to(ACCEL)), cpu[1].matmul(x))


@pytest.mark.parametrize("m", [1, 11])
def test_gate_up_swiglu_in_one_launch(m):
    cpu = [_matrix(n, 96, T.Q4_K, i) for i, n in enumerate(("gate", "up"))]
    dev = [_matrix(n, 96, T.Q4_K, i).to_device(ACCEL, True, torch.float32) for i, n in enumerate(("gate", "up"))]
    x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, K)).astype(np.float32))
    stack = Stack(dev)
    assert len(stack.groups) == 1 and stack.groups[0][2] == [96, 96]
    ref = torch.nn.functional.silu(cpu[0].matmul(x)) * cpu[1].matmul(x)
    assert _close(stack.swiglu(x.to(ACCEL)), ref)


def test_torch_path_keeps_weights_apart():
    """On the CPU path nothing is stacked, and the results are the weights' own, bit for bit."""
    mats = [_matrix(n, 32, T.Q8_0, i) for i, n in enumerate(("gate", "up"))]
    stack = Stack(mats)
    assert [g[0] for g in stack.groups] == mats
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, K)).astype(np.float32))
    assert torch.equal(stack.swiglu(x), torch.nn.functional.silu(mats[0].matmul(x)) * mats[1].matmul(x))
