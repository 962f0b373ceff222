"""The CPU fast path (runtime/packed.py) against gguf-py's dequantization.

Tolerances, relative to sum_k |x_k| |W_nk| per output (the scale of its rounding errors):
- bf16 dense (F16, BF16): activation, weight and output each rounded to bf16 (2^-9 each), so at
  most 3 * 2^-9 = 5.9e-3, a worst-case bound.
- int4 types (Q4_K, Q4_0, Q4_1, Q6_K, Q5_K, Q5_0, Q5_1, Q8_0, Q3_K, Q2_K, IQ4_NL, IQ4_XS, the grid
  types IQ1_S ... IQ3_S): bf16 activations, scale and zero point (2^-9 each; the zero point 8*s - min can be
  twice |w|) and output -> 2^-7 = 7.8e-3. Measured (2026-11-23): at most 0.43 * 2^-8, Q2_K
  0.69 * 2^-8 (its zero, -min, rounded as Q4_K's).
A wrong nibble, row or group order gives errors of the size of the output itself (checked by
hand: swapping Q6_K's halves or Q4_K's nibbles fails every case here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from quant_weights import ENCODERS, random_grid_blocks
from qvl.convert.quant import quantize
from qvl.runtime import cpu_gemm
from qvl.runtime.cpu_gemm import cpu_flags
from qvl.runtime.gguf_file import GGUFFile, TensorInfo
from qvl.runtime.iq_grids import GRID_TYPES, SCALE_GROUP, grid_fields
from qvl.runtime.packed import (
    DENSE_FROM_M,
    DENSE_FROM_M_F32,
    INT4_TYPES,
    PackedMatrix,
    pack_int4,
    q4_0_fields,
    iq4_fields,
    q2_q3_k_fields,
    q4_k_fields,
    q5_0_fields,
    q5_k_high_bits,
    q8_0_fields,
    q6_k_fields,
)
from qvl.runtime.weights import EXACT, PACKED, STREAMED, Matrix, Weights

TOL = {T.F16: 3 * 2**-9, T.BF16: 3 * 2**-9,
       T.Q4_K: 2**-7, T.Q4_0: 2**-7, T.Q4_1: 2**-7, T.Q6_K: 2**-7, T.Q5_K: 2**-7, T.Q5_0: 2**-7, T.Q5_1: 2**-7,
       T.Q8_0: 2**-7, T.Q3_K: 2**-7, T.Q2_K: 2**-7,
       T.IQ4_NL: 2**-7, T.IQ4_XS: 2**-7, **{qt: 2**-7 for qt in GRID_TYPES}}


def _raw(qtype: T, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[0, :256] = 0.0  # a zero block
    w[1] *= 1e3  # huge and tiny scales
    w[2] *= 1e-4
    if qtype == T.F16:
        raw = w.astype(np.float16).view(np.uint8)
    elif qtype == T.BF16:
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        # qvl writes no Q3_K / Q2_K / IQ types: llama.cpp's layouts by the tests' round-to-nearest encoders
        raw = ENCODERS[qtype](w) if qtype in ENCODERS else quantize(w, qtype)
        raw = raw.reshape(rows, -1)
    return raw, torch.from_numpy(dequantize(raw, qtype).reshape(rows, cols).astype(np.float32))


@pytest.mark.parametrize("shape", [(64, 32), (128, 256), (192, 2048), (80, 64)])
def test_pack_int4_is_torch_layout(shape):
    q = torch.randint(0, 16, shape, dtype=torch.int32)
    ours = pack_int4(q)
    theirs = torch._convert_weight_to_int4pack_for_cpu(torch.nn.functional.pad(q, (0, 0, 0, -shape[0] % 64)), 2)
    assert torch.equal(ours, theirs)


def test_block_fields_equal_dequantization():
    rows, cols = 8, 512
    raw, ref = _raw(T.Q4_K, rows, cols)
    q, scale, mins = q4_k_fields(torch.from_numpy(raw))
    w = q.float() * scale.repeat_interleave(32, 1) - mins.repeat_interleave(32, 1)
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)
    raw, ref = _raw(T.Q6_K, rows, cols)
    lo, hi, scale = q6_k_fields(torch.from_numpy(raw))
    assert lo.max() <= 15 and hi.max() <= 3
    torch.testing.assert_close((lo.int() + 16 * hi.int() - 32).float() * scale.repeat_interleave(16, 1), ref, rtol=1e-6, atol=1e-6)
    raw, ref = _raw(T.Q5_K, rows, cols)
    q, scale, mins = q4_k_fields(torch.from_numpy(raw), 176)
    hb = q5_k_high_bits(torch.from_numpy(raw))
    assert hb.max() == 1 and q.max() <= 15
    w = (q + 16 * hb).float() * scale.repeat_interleave(32, 1) - mins.repeat_interleave(32, 1)
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)
    for qtype, with_min in ((T.Q4_0, False), (T.Q4_1, True)):
        raw, ref = _raw(qtype, rows, cols)
        q, scale, offset = q4_0_fields(torch.from_numpy(raw), with_min)
        w = q.float() * scale.repeat_interleave(32, 1) + offset.repeat_interleave(32, 1)
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)
    for qtype, with_min in ((T.Q5_0, False), (T.Q5_1, True)):
        raw, ref = _raw(qtype, rows, cols)
        q, hb, scale, offset = q5_0_fields(torch.from_numpy(raw), with_min)
        assert q.max() <= 15 and hb.min() == 0 and hb.max() == 1
        w = (q + 16 * hb).float() * scale.repeat_interleave(32, 1) + offset.repeat_interleave(32, 1)
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)
    raw, ref = _raw(T.Q8_0, rows, cols)
    v, scale = q8_0_fields(torch.from_numpy(raw))
    assert v.min() == -127 and v.max() == 127  # ggml's Q8_0 scales each block's largest |w| to 127
    torch.testing.assert_close(v.float() * scale.repeat_interleave(32, 1), ref, rtol=1e-6, atol=1e-6)
    for qtype in (T.IQ4_NL, T.IQ4_XS):
        raw, ref = _raw(qtype, rows, cols)
        v, scale = iq4_fields(torch.from_numpy(raw), qtype)
        assert v.min() == -127  # each block's largest-magnitude weight in these encoders
        torch.testing.assert_close(v.float() * scale.repeat_interleave(32, 1), ref, rtol=1e-6, atol=1e-6)
    for qtype, top in ((T.Q3_K, 7), (T.Q2_K, 3)):
        raw, ref = _raw(qtype, rows, cols)
        q, scale, offset = q2_q3_k_fields(torch.from_numpy(raw), qtype)
        assert q.min() == 0 and q.max() == top
        w = q.float() * scale.repeat_interleave(16, 1) + offset.repeat_interleave(16, 1)
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype", GRID_TYPES, ids=lambda t: t.name)
def test_grid_fields_equal_dequantization(qtype):
    """Integer levels times scales are gguf-py's weights bit for bit, on random bytes (every grid
    index, sign pattern, scale and delta bit) and on the encoders' rows (zero, huge, tiny)."""
    blocks = random_grid_blocks(16, 6 * 256, qtype, np.random.default_rng(int(qtype)))
    for raw in (blocks, _raw(qtype, 8, 512)[0]):
        v, scale = grid_fields(torch.from_numpy(raw), qtype)
        assert v.dtype == torch.int16 and v.abs().max() <= 62
        w = v.float() * scale.repeat_interleave(SCALE_GROUP[qtype], 1)
        assert torch.equal(w, torch.from_numpy(dequantize(raw, qtype).reshape(len(raw), -1)))


# 200: tiles for every int4 type (DENSE_FROM_M, DENSE_FROM_M_F32); 5: float32 tiles for F16 / BF16 where
# GEMMs run in float32 (DENSE_TILES_FROM_M), the int4 op for the rest
@pytest.mark.parametrize("m", [1, 5, 200])
@pytest.mark.parametrize("rows,cols", [(64, 256), (70, 512), (300, 768)])  # 70, 300: padded to 64s; 300: two tiles
@pytest.mark.parametrize("qtype", list(TOL), ids=lambda t: t.name)
def test_packed_matmul_matches_dequantized(qtype, rows, cols, m, cpu_gemms):
    raw, w = _raw(qtype, rows, cols, seed=rows + cols)
    packed = PackedMatrix(qtype, raw, rows, cols)
    assert packed.int4 == (qtype in INT4_TYPES)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
    y, ref = packed.matmul(x), x @ w.T
    assert y.shape == (m, rows) and y.dtype == torch.float32
    err = ((y - ref).abs() / (x.abs() @ w.abs().T).clamp_min(1e-30)).max().item()
    assert err <= TOL[qtype], err


@pytest.mark.parametrize("m", [1, 5, 200])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL], ids=lambda t: t.name)
def test_rows_of_32_weight_blocks_not_a_multiple_of_256(qtype, m, cpu_gemms):
    """Rows of 192 and 896 weights (Qwen2.5-0.5B's width, whose matrices llama.cpp writes in 32-weight
    types): the int4 op and its tiles (m = 200), as wide rows'."""
    for rows, cols in ((70, 192), (64, 896)):
        raw, w = _raw(qtype, rows, cols, seed=cols)
        packed = PackedMatrix(qtype, raw, rows, cols)
        assert packed.int4
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
        y, ref = packed.matmul(x), x @ w.T
        err = ((y - ref).abs() / (x.abs() @ w.abs().T).clamp_min(1e-30)).max().item()
        assert y.shape == (m, rows) and err <= TOL[qtype], err


@pytest.mark.parametrize("qtype", INT4_TYPES, ids=lambda t: t.name)
def test_a_transposed_input_takes_the_int4_op_too(qtype):
    """x as a tiled product leaves it (its transpose's view: a matrix of another type fed by one
    whose rows went through tiles, e.g. an IQ2_M file's IQ3_S ffn_down after IQ2_S gate/up) gives
    what the contiguous x gives: the int4 op takes only a contiguous one."""
    raw, _ = _raw(qtype, 64, 256)
    packed = PackedMatrix(qtype, raw, 64, 256)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    xt = x.T.contiguous().T  # column-major, as tiled_product's out.T
    assert not xt.is_contiguous()
    assert torch.equal(packed.matmul(xt), packed.matmul(x))


@pytest.mark.parametrize("qtype", INT4_TYPES, ids=lambda t: t.name)
def test_tiles_are_the_int4_ops_weights(qtype, cpu_gemms):
    """The prefill path's tiles hold exactly the weights the int4 op multiplies by (its product
    with the identity, rounded to bf16), for whole and partial tiles, padding rows included: bf16
    tiles, or float32 ones that round to them."""
    raw, _ = _raw(qtype, 300, 512)
    packed = PackedMatrix(qtype, raw, 300, 512)
    weights = packed.int4_product(torch.eye(512, dtype=torch.bfloat16)).T  # (320, 512)
    dtype = torch.bfloat16 if cpu_gemms == "bf16" else torch.float32
    assert packed.tile(0, 320).dtype == dtype
    assert torch.equal(packed.tile(0, 320).bfloat16(), weights)
    assert torch.equal(packed.tile(64, 192).bfloat16(), weights[64:192])
    assert torch.equal(packed.tile(256, 320).bfloat16(), weights[256:320])
    assert packed.tiles_from_m() == (DENSE_FROM_M if cpu_gemms == "bf16" else DENSE_FROM_M_F32)[qtype]
    x = torch.randn(int(packed.tiles_from_m()), 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    tiled, int4 = packed.tiled_product(x).float()[:, :300], packed.int4_product(x).float()[:, :300]
    scale = (x.float().abs() @ weights[:300].float().abs().T).clamp_min(1e-30)
    assert ((tiled - int4).abs() / scale).max() <= 2 * 2**-8  # each output rounded to bf16 once


def test_int4_weights_take_a_third_of_bf16():
    raw, _ = _raw(T.Q4_K, 128, 1024)
    assert PackedMatrix(T.Q4_K, raw, 128, 1024).nbytes() == 128 * 1024 * (0.5 + 4 / 32)
    raw, _ = _raw(T.Q6_K, 128, 1024)
    assert PackedMatrix(T.Q6_K, raw, 128, 1024).nbytes() == 128 * 1024 * (1 + 4 / 16)
    raw, _ = _raw(T.Q5_K, 128, 1024)  # two 4-bit groups a 32-weight sub-block: 0.63 of bf16's bytes
    assert PackedMatrix(T.Q5_K, raw, 128, 1024).nbytes() == 128 * 1024 * (1 + 2 * 4 / 32)
    for qtype in (T.IQ4_NL, T.IQ4_XS, T.Q5_0, T.Q5_1, T.Q8_0):  # two 4-bit groups a 32-weight block, as Q5_K
        raw, _ = _raw(qtype, 128, 1024)
        assert PackedMatrix(qtype, raw, 128, 1024).nbytes() == 128 * 1024 * (1 + 2 * 4 / 32)
    for qtype in (T.Q3_K, T.Q2_K):  # a 32-group a 16-weight sub-block, as Q6_K: 0.63 of bf16's bytes
        raw, _ = _raw(qtype, 128, 1024)
        assert PackedMatrix(qtype, raw, 128, 1024).nbytes() == 128 * 1024 * (1 + 4 / 16)
    for qtype in GRID_TYPES:  # two 4-bit halves a weight, a scale pair per 32 or a 32-group per 16 weights;
        raw, _ = _raw(qtype, 128, 1024)  # IQ3_S, IQ1_S: one 4-bit code, as Q4_K
        one_code = qtype in (T.IQ3_S, T.IQ1_S)
        per_weight = (0.5 + 4 / 32) if one_code else (1 + 4 / 16)
        assert PackedMatrix(qtype, raw, 128, 1024).nbytes() == 128 * 1024 * per_weight


def test_modes_through_weights(fixtures_dir):
    path = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"
    with GGUFFile(path) as f:
        name = "blk.0.ffn_up.weight"
        before = f.raw(name).copy()
        x = torch.randn(3, f.tensors[name].shape[1])
        exact = Weights(f, mode=EXACT).matrix(name).matmul(x)
        for mode in (PACKED, STREAMED):
            y = Weights(f, mode=mode).matrix(name).matmul(x)  # both release the tensor's pages
            scale = x.abs() @ Weights(f).matrix(name).rows_f32(0, len(before)).abs().T
            assert ((y - exact).abs() / scale).max().item() <= TOL[T.F16]
        assert np.array_equal(f.raw(name), before)  # released pages read back the same bytes
        with pytest.raises(ValueError, match="weights mode 'fast'"):
            Weights(f, mode="fast")
    w = np.arange(32, dtype=np.float32).reshape(4, 8)  # F32 weights stay float32 in every mode
    m = Matrix(TensorInfo("w", T.F32, (8, 4), 0, 128), w.view(np.uint8), mode=PACKED)
    assert m.mode == EXACT and torch.equal(m.matmul(torch.eye(8)), torch.from_numpy(w).T)


_CAPABILITY_CHECK = """
import sys
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from quant_weights import quant_weights
from qvl.runtime.packed import PackedMatrix, int4_layout, pack_int4
assert torch.backends.cpu.get_cpu_capability() == sys.argv[1].upper(), torch.backends.cpu.get_cpu_capability()
q = torch.randint(0, 16, (192, 64), dtype=torch.int32)
assert torch.equal(pack_int4(q), torch._convert_weight_to_int4pack_for_cpu(q, 2)), int4_layout()
for qtype in (T.Q4_K, T.Q6_K, T.Q8_0):
    raw = quant_weights(300, 512, qtype, "normal", seed=0).numpy()
    w = torch.from_numpy(dequantize(raw, qtype).reshape(300, 512))
    packed = PackedMatrix(qtype, raw, 300, 512)
    assert packed.int4
    x = torch.randn(3, 512)
    err = ((packed.matmul(x) - x @ w.T).abs() / (x.abs() @ w.abs().T)).max().item()
    assert err <= 2**-7, (qtype.name, err)
    assert torch.equal(packed.tile(0, 320).bfloat16(), packed.int4_product(torch.eye(512, dtype=torch.bfloat16)).T)
print(int4_layout()[0])
"""


@pytest.mark.parametrize("capability,block", [("default", 32), ("avx2", 32), ("avx512", 64)])
def test_int4_layout_of_each_cpu_kernel(capability, block):
    """torch's int4 weight layout depends on the vector width its kernels were dispatched for
    (AVX-512: 64-row blocks, AVX2: 32, none: 32 with neighbouring rows in a byte); packing, the
    int4 op's products and the tiles agree under each, forced with ATEN_CPU_CAPABILITY in a fresh
    process. A capability this CPU lacks cannot run here (forcing it dies of an illegal
    instruction); the in-process tests above run on the host's own."""
    needs = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}.get(capability, set())
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU has no {capability}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", _CAPABILITY_CHECK, capability], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(block)]


@pytest.mark.parametrize("qtype", list(TOL), ids=lambda t: t.name)
def test_the_same_numbers_whatever_the_cpus_gemms(qtype, monkeypatch):
    """Float32 GEMMs (a CPU without bf16 instructions) multiply bf16's values and round their
    products to bf16, as bf16 GEMMs do: 200 rows (tiles on both) give the same outputs on either
    kind of CPU, but for the order of the sums (at most one bf16 rounding apart, and seldom);
    and for bf16 / F16 weights, whose GEMMs run in float32 from 3 rows there but in bf16 below,
    rows multiplied together give what each gives alone (a prompt read whole or a token at a
    time, cached or not: the same logits). Before, float32 tiles kept x and the products in
    float32: under 0.01 % of the outputs were equal."""
    raw, w = _raw(qtype, 300, 512, seed=3)
    x = torch.randn(200, 512, generator=torch.Generator().manual_seed(4))
    scale = x.abs() @ w.abs().T
    out = {}
    for kind in ("1", "0"):
        monkeypatch.setenv(cpu_gemm.ENV, kind)
        cpu_gemm.bf16_gemms.cache_clear()
        packed = PackedMatrix(qtype, raw, 300, 512)
        out[kind] = packed.matmul(x)
        if qtype in (T.F16, T.BF16):
            alone = torch.cat([packed.matmul(x[i:i + 1]) for i in range(len(x))])
            assert (alone == out[kind]).float().mean() >= 0.99
            assert ((alone - out[kind]).abs() / scale).max() <= 2**-8
    cpu_gemm.bf16_gemms.cache_clear()
    assert (out["0"] == out["1"]).float().mean() >= 0.99
    assert ((out["0"] - out["1"]).abs() / scale).max() <= 2**-8
