"""scripts/bench_kernels.py's measurements run end to end on tiny shapes (in Triton's interpreter
here, compiled on a GPU; a stand-in timer), so a GPU session does not find them broken: each checks its kernel against
its reference before timing, and each row carries the fields docs/benchmarks.md reports."""

from __future__ import annotations

import importlib.util

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import pytest
from interpret import ACCEL
from paths import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timer(fn) -> float:
    fn()  # runs once, as do_bench's first call would
    return 1.0


def _graph_timer(make_call, weight) -> float:  # bench_kernels.graph_ms's stand-in
    return _timer(make_call(weight))


@pytest.fixture(scope="module")
def bench():
    return _bench()


def test_qmatmul_rows(bench):
    rows = bench.bench_qmatmul(ACCEL, _timer, {"tiny": [(24, 256)]}, ms_=(1, 9), graph_timer=_graph_timer)
    assert len(rows) == 10  # Q4_K, Q6_K, Q8_0, Q5_K, Q4_0 x (GEMV, GEMM)
    assert all("weight_GB_s" in r and r["vs_no_ptx"] == 1.0 for r in rows if r["m"] == 1)
    assert all("TFLOP_s" in r and r["vs_torch_bf16_matmul"] == 1.0 for r in rows if r["m"] == 9)


def test_low_bit_gemv_rows(bench):
    """--low-bit: the batch-1 GEMV of every type outside the default list, Q2_K / Q3_K / IQ4
    from random blocks (no quantizer of qvl's writes them), each checked before it is timed."""
    rows = bench.bench_qmatmul(ACCEL, _timer, {"tiny": [(24, 256)]}, ms_=(1,), types=bench.LOW_BIT_TYPES,
                               graph_timer=_graph_timer)
    assert [r["kernel"] for r in rows] == [f"qmatmul {t}" for t in bench.LOW_BIT_TYPES]
    assert all("weight_GB_s" in r and r["vs_no_ptx"] == 1.0 for r in rows)


def test_attention_rows(bench):
    rows = bench.bench_attention(ACCEL, _timer, (("windows", [16, 16], 2, 2, 80, False),
                                                 ("prefill", [24], 4, 2, 32, True)))
    assert [r["tokens"] for r in rows] == [32, 24]


def test_decode_attention_rows(bench):
    rows = bench.bench_decode_attention(ACCEL, (("tiny", 4, 2, 64),), capacity=256, graph_timer=_graph_timer)
    assert {r["kernel"] for r in rows} == {"decode attention bf16 cache", "decode attention q8_0 cache"}
    assert {r["context"] for r in rows} == {64, 256}


def test_sweep_rows(bench):
    rows = bench.sweep(ACCEL, _timer, (("Q4_K", 32, 512),), m=16,
                       gemv={"block_n": (4, 16), "num_warps": (4,), "prefetch": (None, 0), "split_k": (None, 2)},
                       tiles=((16, 16, 64, 4),), graph_timer=_graph_timer)
    gemv = [r for r in rows if r["kernel"] == "GEMV Q4_K"]
    assert len(gemv) == 4 and {r["split_k"] for r in gemv} == {"default", 2}
    assert {r["prefetch"] for r in gemv} == {"default", 0}
    assert [r["tiles"] for r in rows if r["kernel"] == "GEMM Q4_K"] == [[16, 16, 64]]


def test_split_rows(bench):
    """--splits: each shape's rows, best first, every split asked for, the default's GB/s beside them."""
    rows = bench.splits(ACCEL, (("Q4_K", 16, 512, False), ("Q6_K", 32, 256, True)), choices=(None, 1, 2),
                        graph_timer=_graph_timer)
    assert [r["kernel"] for r in rows] == ["GEMV Q4_K"] * 3 + ["GEMV Q6_K swiglu"] * 3
    for part in (rows[:3], rows[3:]):
        assert {r["split_k"] for r in part} == {"default", 1, 2}
        assert [r["ms"] for r in part] == sorted(r["ms"] for r in part)
        default = next(r for r in part if r["split_k"] == "default")
        assert all(r["default_GB_s"] == default["weight_GB_s"] for r in part)


def test_int8_rows(bench):
    """--int8: one row a shape, both kernels timed, the int8 result's error against the float
    GEMV small (x rounded to 8 bits: under 2^-5 of max |y| on N(0, 1) rows)."""
    rows = bench.int8_gemv(ACCEL, ((16, 512), (40, 256)), graph_timer=_graph_timer)
    assert [(r["kernel"].split()[1], r["n"], r["k"]) for r in rows] == [
        (t, n, k) for t in ("Q4_K", "Q5_K", "Q6_K") for n, k in ((16, 512), (40, 256))]
    assert all(r["ms"] > 0 and r["float_ms"] > 0 and 0 < r["rel_err_vs_float"] < 2 ** -5 for r in rows)


def test_rope_and_norm_rows(bench):
    """Rotary (head dim 80 and 128, GQA) and RMSNorm with its residual add (bf16 and float32
    outputs), each checked against its reference before it is timed."""
    import torch

    rows = bench.bench_rope_norm(ACCEL, _timer, (("vision", 19, 3, 3, 80), ("text", 7, 4, 2, 128)),
                                 (("bf16", 9, 96, torch.bfloat16, torch.bfloat16),
                                  ("decode", 1, 64, torch.float32, torch.float32)))
    assert [r["kernel"] for r in rows] == ["rope vision", "rope text", "rmsnorm bf16", "rmsnorm decode"]
    assert all({"GB_s", "ms", "tokens"} <= set(r) and r["vs_torch"] == 1.0 for r in rows)
