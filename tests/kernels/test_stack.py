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


TAIL_K = 800  # 3 whole 256-weight steps for the kernels, 32 columns past them for the dense tail


def _wide(rows: int, qtype: T, seed: int) -> tuple[Matrix, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((rows, TAIL_K)).astype(np.float32)
    raw = quantize(w, qtype)
    return Matrix(TensorInfo(f"w{seed}", qtype, (TAIL_K, rows), 0, raw.nbytes), raw), torch.from_numpy(w)


@pytest.mark.parametrize("m", [1, 3, 11])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q5_1], ids=lambda t: t.name)  # Q6_K / Q4_K / Q5_K fallbacks
def test_rows_past_the_last_step_take_a_dense_tail(qtype, m):
    """A weight whose K is not a multiple of 256 keeps its blocks on the device (the kernels
    read the first 768 columns in place) with only the last 32 columns dense; every epilogue
    (bias, residual, SwiGLU of a stacked pair, the next RMSNorm) comes after the tail's share."""
    cpu, _ = _wide(48, qtype, 1)
    dev, _ = _wide(48, qtype, 1)
    dev.to_device(ACCEL, True, torch.float32)
    blocks = dev.kernel
    assert blocks is not None and blocks.head == 768 and blocks.tail is not None and blocks.tail.shape == (48, 32)
    assert blocks.raw.shape == (48, cpu.raw.shape[1])  # all of the blocks, no dense copy of the head
    rng = np.random.default_rng(m)
    x = torch.from_numpy(rng.standard_normal((m, TAIL_K)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(48).astype(np.float32))
    res = torch.from_numpy(rng.standard_normal((m, 48)).astype(np.float32))
    ref = cpu.matmul(x)
    assert _close(dev.matmul(x.to(ACCEL)), ref)
    assert _close(dev.matmul(x.to(ACCEL), bias.to(ACCEL), res.to(ACCEL)), ref + bias + res)
    norm_w = torch.from_numpy(rng.standard_normal(48).astype(np.float32))
    y, normed = dev.matmul_norm(x.to(ACCEL), norm_w.to(ACCEL), 1e-6, res.to(ACCEL))
    y_ref = ref + res
    assert _close(y, y_ref)
    assert _close(normed, norm_w * y_ref * torch.rsqrt(y_ref.pow(2).mean(-1, keepdim=True) + 1e-6))
    gate_up = [_wide(24, qtype, s)[0].to_device(ACCEL, True, torch.float32) for s in (2, 3)]
    stack = Stack(gate_up)
    assert len(stack.groups) == 1 and isinstance(stack.groups[0][0], DeviceBlocks)
    gate, up = (_wide(24, qtype, s)[0].matmul(x) for s in (2, 3))
    assert _close(stack.swiglu(x.to(ACCEL)), torch.nn.functional.silu(gate) * up)
    assert _close(gate_up[1].matmul(x.to(ACCEL)), up)  # a part still multiplies alone, tail view included


@pytest.mark.parametrize("qtype", [T.F16, T.F32], ids=lambda t: t.name)
def test_dense_copies_stack_into_one_gemm(qtype):
    """The vision tower's F16 / F32 weights on an accelerator are dense copies (bf16 / float32):
    q/k/v stack into one (rows, cols) tensor, each part's copy a view into it, and the products
    (biases added after) are each weight's own."""
    from qvl.runtime.stack import DenseStack

    rng = np.random.default_rng(7)
    rows = (40, 24, 24)
    w = [rng.standard_normal((r, K)).astype(np.float32) for r in rows]
    raws = [a.astype(np.float16).view(np.uint8) if qtype == T.F16 else a.view(np.uint8) for a in w]

    def mats() -> list[Matrix]:
        return [Matrix(TensorInfo(n, qtype, (K, r), 0, raw.nbytes), raw) for n, r, raw in zip("qkv", rows, raws)]

    alone = [m.to_device(ACCEL, True, torch.bfloat16) for m in mats()]
    dev = [m.to_device(ACCEL, True, torch.bfloat16) for m in mats()]
    biases = [torch.from_numpy(rng.standard_normal(r).astype(np.float32)).to(ACCEL) for r in rows]
    stack = Stack(dev, biases)
    assert len(stack.groups) == 1 and isinstance(stack.groups[0][0], DenseStack)
    dense = stack.groups[0][0].dense
    assert dense.dtype == (torch.float32 if qtype == T.F32 else torch.bfloat16) and dense.shape == (88, K)
    assert dev[1]._device_dense.data_ptr() == dense.data_ptr() + 40 * K * dense.element_size()
    x = torch.from_numpy(rng.standard_normal((5, K)).astype(np.float32)).to(ACCEL)
    for got, mat, b in zip(stack.matmul(x), alone, biases):
        assert _close(got, mat.matmul(x, b).cpu())
    assert _close(dev[2].matmul(x), alone[2].matmul(x).cpu())  # a part still multiplies alone


def test_linear_keeps_each_products_precision():
    """Stack.linear (the vision tower's kernel path): dense bf16 copies give bf16 products with
    the bias added by the GEMM (2^-7 of max |y| against `matmul`, which rounds the product to bf16
    and adds the bias in float32: here the bias and the sum are rounded, half a bf16 ulp each, up
    to three such roundings apart), quantized blocks float32 products equal to `matmul`'s."""
    rng = np.random.default_rng(11)
    rows = (40, 24)
    raws = [rng.standard_normal((r, K)).astype(np.float16).view(np.uint8) for r in rows]
    dense = [Matrix(TensorInfo(n, T.F16, (K, r), 0, raw.nbytes), raw).to_device(ACCEL, True, torch.bfloat16)
             for n, r, raw in zip("qk", rows, raws)]
    biases = [torch.from_numpy(rng.standard_normal(r).astype(np.float32)).to(ACCEL) for r in rows]
    x = torch.from_numpy(rng.standard_normal((5, K)).astype(np.float32)).to(ACCEL)
    stack = Stack(dense, biases)
    for got, ref in zip(stack.linear(x), stack.matmul(x)):
        assert got.dtype == torch.bfloat16
        assert (got.float() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()
    quant = Stack([_matrix(n, 32, T.Q4_K, i).to_device(ACCEL, True, torch.float32) for i, n in enumerate("qk")])
    for got, ref in zip(quant.linear(x), quant.matmul(x)):
        assert got.dtype == torch.float32 and torch.equal(got, ref)
