#!/usr/bin/env python3
"""Kernel timings on a GPU against torch baselines measured in the same run.

For the 3B and 7B shapes, each kernel in the precision the model runs it in by default:
- qmatmul (Q4_K, Q6_K, Q8_0, and Q5_K / Q4_0 of Q5_K_M / Q4_0 files): M = 1 (decode GEMV, float32 x) with achieved GB/s of weight bytes
  and % of the measured device-to-device copy bandwidth, and its time without inline PTX (the
  plain-Triton codes and no L2 prefetch, as on ROCm: what the assembly gains); M = 512
  (prefill GEMM, bf16 x) with TFLOP/s; both against torch.matmul on the dequantized weight in
  bf16;
- attention (bf16): vision windows and a full-attention image (head dim 80), causal prefill
  with GQA, against F.scaled_dot_product_attention in bf16;
- decode attention over a 4k cache (bf16 and q8_0) against F.scaled_dot_product_attention on
  the bf16 cache (enable_gqa);
- rotary (q and k in one launch) and RMSNorm with its residual add, GB/s of what each reads and
  writes and % of the copy bandwidth, against the same work in eager torch.
Every kernel is checked against its reference before it is timed. Median of
triton.testing.do_bench, except the GEMVs (M = 1, and the sweep's) and decode attention: their
calls are replayed from a CUDA graph, as the runtime replays its decode step (`graph_ms`), each
call reading its own copy of the weight (or cache) so that together they overflow L2 and every
call streams its operands from memory, as decode does. do_bench launches each call from Python:
a GEMV's few microseconds hide behind the launch's tens (first H200 run: every 7B GEMV took
43-77 us that way).
Needs CUDA.

    python scripts/bench_kernels.py > docs/bench-kernels.json
    python scripts/bench_kernels.py --sweep   # launch parameters of the GEMV and GEMM, best first
    python scripts/bench_kernels.py --low-bit # the decode GEMV of the other types (LOW_BIT_TYPES)
    python scripts/bench_kernels.py --quick   # the 7B's Q4_K and Q6_K decode GEMVs only (a minute)
    python scripts/bench_kernels.py --splits  # every 7B Q4_K_M decode GEMV shape over K splits
    python scripts/bench_kernels.py --int8    # the Q4_K / Q5_K / Q6_K GEMVs on int8 activations against qgemv

`--low-bit` times the batch-1 GEMV of the types of Q2_K / Q3_K_M / IQ4_XS / Q4_1 / Q5_K_M files
and of llama.cpp's IQ1-IQ3 files (the grid types) on the 3B and 7B shapes. Those weights are
random blocks with set scales (tests/quant_weights.py; ggml's own searches, which qvl quantize
runs, take minutes at these shapes), which a GEMV streams as it streams any.

`--sweep` times the 7B's largest decode GEMVs (Q4_K gate/up stacked, Q6_K down) over rows per
program, warps, L2 prefetch distance and K splits, and its prefill GEMM over tile shapes, as GB/s (GEMV) or TFLOP/s
(GEMM), so the defaults in kernels/qgemv.py and kernels/qmatmul.py can be set from one run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Timer = Callable[[Callable[[], object]], float]  # milliseconds per call
Operands = torch.Tensor | tuple[torch.Tensor, ...]  # what a timed call streams: a weight, or a cache's k, v, ...
GraphTimer = Callable[[Callable[[Operands], Callable[[], object]], Operands], float]  # graph_ms's signature


def graph_ms(make_call: Callable[[Operands], Callable[[], object]], operands: Operands,
             rounds: int = 20, repeats: int = 10) -> float:
    """Milliseconds per call of `make_call(ops)()`, replayed from a CUDA graph that holds `rounds`
    passes over copies of `operands` (at least 3x the L2 cache together): the median of
    `repeats` replays, over the calls in one."""
    parts = operands if isinstance(operands, tuple) else (operands,)
    l2 = getattr(torch.cuda.get_device_properties(parts[0].device), "L2_cache_size", 64 << 20)
    copies = max(1, math.ceil(3 * l2 / sum(t.numel() * t.element_size() for t in parts)))

    def copy() -> Operands:
        return tuple(t.clone() for t in operands) if isinstance(operands, tuple) else operands.clone()

    calls = [make_call(ops) for ops in [operands] + [copy() for _ in range(copies - 1)]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and warms up outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph, calls
    return statistics.median(times) / (rounds * copies)

QMATMUL_SHAPES = {"3b": [(2048, 2048), (11008, 2048), (2048, 11008)],
                  "7b": [(3584, 3584), (18944, 3584), (3584, 18944)]}
ATTENTION_CASES = (  # name, segment lengths, heads, kv heads, head dim, causal
    ("vision windows", [256] * 50, 16, 16, 80, False),
    ("vision full 1000x2530", [12960], 16, 16, 80, False),
    ("text prefill 7b", [2048], 28, 4, 128, True),
)
DECODE_CASES = (("3b", 16, 2, 128), ("7b", 28, 4, 128))  # name, heads, kv heads, head dim
LOW_BIT_TYPES = ("Q4_1", "Q5_1", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                 "IQ1_M", "IQ1_S")


def bench_qmatmul(dev: str, timer: Timer, shapes: dict, ms_: tuple[int, ...] = (1, 512),
                  types: tuple[str, ...] = ("Q4_K", "Q6_K", "Q8_0", "Q5_K", "Q4_0"),
                  graph_timer: GraphTimer = graph_ms) -> list[dict]:
    from gguf import GGMLQuantizationType as T

    from qvl.convert.quant import dequantize
    from qvl.kernels.qmatmul import qmatmul
    from qvl.kernels.target import pretending, target
    from qvl.runtime.iq_grids import GRID_TYPES

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from quant_weights import quant_weights, random_grid_blocks  # N(0, 1) rows by qvl's quantizers, else random blocks

    rows = []
    for model, mats in shapes.items():
        for n, k in mats:
            for qt in (T[name] for name in types):
                if qt in GRID_TYPES:  # random bytes: the encoders' grid search takes minutes at these shapes
                    raw = torch.from_numpy(random_grid_blocks(n, k, qt, np.random.default_rng(0))).to(dev)
                else:
                    raw = quant_weights(n, k, qt, "normal", seed=0).to(dev)
                dense = torch.from_numpy(dequantize(raw.cpu().numpy(), qt).reshape(n, k)).to(dev)
                dense16 = dense.to(torch.bfloat16)
                for m in ms_:
                    x = torch.randn(m, k, device=dev, dtype=torch.float32 if m == 1 else torch.bfloat16)
                    ref = x.float() @ dense.T
                    got = qmatmul(x, raw, qt, n, k)
                    tol = 1e-4 if m == 1 else 1e-2  # float32 products / bf16 operands
                    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item(), (qt.name, m, n, k)
                    if m == 1:  # replayed: a GEMV is shorter than its launch from Python
                        ms = graph_timer(lambda w: lambda: qmatmul(x, w, qt, n, k), raw)
                        base = graph_timer(lambda w: lambda: x.to(torch.bfloat16) @ w.T, dense16)
                    else:
                        ms = timer(lambda: qmatmul(x, raw, qt, n, k))
                        base = timer(lambda: x.to(torch.bfloat16) @ dense16.T)
                    row = {"model": model, "kernel": f"qmatmul {qt.name}", "m": m, "n": n, "k": k,
                           "ms": round(ms, 4), "vs_torch_bf16_matmul": round(base / ms, 2)}
                    if m == 1:
                        row["weight_GB_s"] = round(raw.numel() / ms / 1e6, 1)
                        with pretending(dataclasses.replace(target(x.device), ptx=False)):
                            plain = qmatmul(x, raw, qt, n, k)
                            assert (plain - ref).abs().max().item() <= tol * ref.abs().max().item(), (qt.name, n, k)
                            row["vs_no_ptx"] = round(graph_timer(lambda w: lambda: qmatmul(x, w, qt, n, k), raw) / ms, 2)
                    else:
                        row["TFLOP_s"] = round(2 * m * n * k / ms / 1e9, 1)
                    rows.append(row)
    return rows


def bench_attention(dev: str, timer: Timer, cases=ATTENTION_CASES) -> list[dict]:
    from qvl.kernels.attention import attention, attention_ref

    rows = []
    bf16 = torch.bfloat16
    for name, segs, heads, kv_heads, d, causal in cases:
        cu = [0]
        for s in segs:
            cu.append(cu[-1] + s)
        q = torch.randn(cu[-1], heads, d, device=dev, dtype=bf16)
        k = torch.randn(cu[-1], kv_heads, d, device=dev, dtype=bf16)
        v = torch.randn(cu[-1], kv_heads, d, device=dev, dtype=bf16)
        check = slice(0, cu[min(2, len(segs))])  # the reference is slow: the first segments
        cut = [c for c in cu if c <= check.stop]
        ref = attention_ref(q[check].cpu().float(), k[check].cpu().float(), v[check].cpu().float(), cut, cut, causal)
        got = attention(q[check], k[check], v[check], cut, cut, causal, dtype=bf16)
        assert (got.cpu() - ref).abs().max().item() < 2e-2, name
        ms = timer(lambda: attention(q, k, v, cu, cu, causal, dtype=bf16))
        sizes = sorted(set(segs))
        qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))

        def sdpa() -> None:
            if len(sizes) == 1:  # equal segments: one batched call
                s = sizes[0]
                F.scaled_dot_product_attention(*(t[0].unflatten(1, (-1, s)).transpose(0, 1) for t in (qt, kt, vt)),
                                               is_causal=causal, enable_gqa=heads != kv_heads)
            else:
                for a, b in zip(cu[:-1], cu[1:]):
                    F.scaled_dot_product_attention(qt[..., a:b, :], kt[..., a:b, :], vt[..., a:b, :],
                                                   is_causal=causal, enable_gqa=heads != kv_heads)

        base = timer(sdpa)
        rows.append({"kernel": f"attention {name}", "tokens": cu[-1], "ms": round(ms, 4), "vs_sdpa": round(base / ms, 2)})
    return rows


ROPE_CASES = (  # name, tokens, heads of q, heads of k, head dim: q and k rotated in one launch, bf16
    ("vision 2530x1000 q+k", 12960, 16, 16, 80), ("7b prefill q+k", 512, 28, 4, 128),
    ("3b prefill q+k", 512, 16, 2, 128))
NORM_CASES = (  # name, rows, width, x's type (the product's), the normed output's type; residual add fused
    ("vision 2530x1000 add+norm", 12960, 1280, torch.bfloat16, torch.bfloat16),
    ("7b prefill add+norm", 512, 3584, torch.bfloat16, torch.bfloat16),
    ("7b decode add+norm", 1, 3584, torch.float32, torch.float32))


def bench_rope_norm(dev: str, timer: Timer, rope_cases=ROPE_CASES, norm_cases=NORM_CASES) -> list[dict]:
    """Rotary (kernels/rope.py) and RMSNorm with its residual add (kernels/rmsnorm.py): GB/s of
    the bytes each reads and writes, against the same work in torch (the runtime's reference
    functions, eager), each checked against its reference first."""
    from qvl.kernels.rmsnorm import rmsnorm, rmsnorm_ref
    from qvl.kernels.rope import apply_rope_
    from qvl.runtime.decoder import Rope, apply_rope, rms_norm

    rows = []
    for name, tokens, heads, kv_heads, d in rope_cases:
        q = torch.randn(tokens, heads, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(tokens, kv_heads, d, device=dev, dtype=torch.bfloat16)
        theta = torch.rand(tokens, d // 2, device=dev) * 100
        rope = Rope(theta)
        ref = apply_rope(q.float().transpose(0, 1), rope.cos, rope.sin).transpose(0, 1)
        got = apply_rope_(q.clone(), theta, k.clone())
        assert (got.float() - ref).abs().max().item() < 2e-2 * ref.abs().max().item(), name  # bf16 rounding
        ms = timer(lambda: apply_rope_(q, theta, k))  # rotates in place, again each call: the same bytes

        def torch_rope() -> None:
            for x in (q, k):
                apply_rope(x.transpose(0, 1), rope.cos.to(x.dtype), rope.sin.to(x.dtype))

        moved = 2 * 2 * (q.numel() + k.numel()) + 4 * theta.numel()
        rows.append({"kernel": f"rope {name}", "tokens": tokens, "ms": round(ms, 4),
                     "GB_s": round(moved / ms / 1e6, 1), "vs_torch": round(timer(torch_rope) / ms, 2)})
    for name, n_rows, width, x_type, out_type in norm_cases:
        x = torch.randn(n_rows, width, device=dev, dtype=x_type)
        res = torch.randn(n_rows, width, device=dev)
        w = torch.rand(width, device=dev) + 0.5
        y, h = rmsnorm(x, w, 1e-6, res, out_type, q8_out=False)
        ref_y, ref_h = rmsnorm_ref(x, w, 1e-6, res)
        assert (h - ref_h).abs().max().item() <= 1e-5 * ref_h.abs().max().item(), name
        tol = 1e-5 if out_type == torch.float32 else 1e-2  # a bf16 output's rounding
        assert (y.float() - ref_y).abs().max().item() <= tol * ref_y.abs().max().item(), name
        ms = timer(lambda: rmsnorm(x, w, 1e-6, res, out_type, q8_out=False))

        def torch_norm() -> None:
            added = x.float() + res
            rms_norm(added, w, 1e-6).to(out_type)

        moved = x.numel() * x.element_size() + 4 * res.numel() + y.numel() * y.element_size() + 4 * h.numel()
        rows.append({"kernel": f"rmsnorm {name}", "tokens": n_rows, "ms": round(ms, 4),
                     "GB_s": round(moved / ms / 1e6, 1), "vs_torch": round(timer(torch_norm) / ms, 2)})
    return rows


def bench_decode_attention(dev: str, cases=DECODE_CASES, capacity: int = 4096,
                           graph_timer: GraphTimer = graph_ms) -> list[dict]:
    """Replayed from a CUDA graph (`graph_ms`, copies of the cache): a 4k cache is a few
    microseconds of reads, less than a launch from Python. SDPA in bf16, timed the same way."""
    from qvl.kernels.decode_attention import decode_attention, decode_attention_ref

    rows = []
    for name, heads, kv_heads, d in cases:
        q = torch.randn(heads, d, device=dev)
        k = torch.randn(kv_heads, capacity, d, device=dev)
        v = torch.randn(kv_heads, capacity, d, device=dev)
        kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
        scales = [(t.unflatten(-1, (-1, 32)).abs().amax(-1) / 127).to(torch.float16) for t in (k, v)]
        k8, v8 = ((t.unflatten(-1, (-1, 32)) / s.float()[..., None]).round().to(torch.int8).flatten(-2)
                  for t, s in zip((k, v), scales))
        for length in (capacity // 4, capacity):
            n = torch.tensor([length], dtype=torch.int32, device=dev)
            for kind, args in (("bf16", (kb, vb, n)), ("q8_0", (k8, v8, n, *scales))):
                ref = decode_attention_ref(q, *args[:2], length, *args[3:])
                assert (decode_attention(q, *args) - ref).abs().max().item() <= 1e-4, (name, kind)
                ms = graph_timer(lambda ops: lambda: decode_attention(q, ops[0], ops[1], n, *ops[2:]),
                                 (args[0], args[1], *args[3:]))
                qq = q.to(torch.bfloat16)[None, :, None]
                base = graph_timer(lambda ops: lambda: F.scaled_dot_product_attention(
                    qq, ops[0][None, :, :length], ops[1][None, :, :length], enable_gqa=True), (kb, vb))
                cache_bytes = sum(t[:, :length].numel() * t.element_size() for t in args[:2])
                rows.append({"model": name, "kernel": f"decode attention {kind} cache", "context": length,
                             "ms": round(ms, 4), "cache_GB_s": round(cache_bytes / ms / 1e6, 1),
                             "vs_sdpa_bf16": round(base / ms, 2)})
    return rows


SWEEP_CASES = (("Q4_K", 2 * 18944, 3584), ("Q6_K", 3584, 18944))  # 7B: gate/up stacked, down
GEMV_SWEEP = {"block_n": (4, 8, 16, 32, 64), "num_warps": (1, 2, 4, 8), "prefetch": (None, 0, 1, 4),
              "split_k": (None, 1, 2, 4, 8)}
GEMM_TILES = ((64, 64, 64, 4), (128, 64, 64, 4), (64, 128, 64, 4), (128, 128, 64, 4), (128, 128, 64, 8),
              (128, 128, 128, 8), (128, 256, 64, 8))  # block_m, block_n, block_k, num_warps


def sweep(dev: str, timer: Timer, cases=SWEEP_CASES, m: int = 2048, gemv=GEMV_SWEEP, tiles=GEMM_TILES,
          graph_timer: GraphTimer = graph_ms) -> list[dict]:
    """GEMV: every (block_n, num_warps) with the default split and L2 prefetch distance, then
    every prefetch distance for the best pair, then every split for the best of those; GEMM:
    each tile shape at M = 2048. Every case's GEMVs come before any GEMM, and each row goes to
    stderr as it is measured, so a run stopped by a time limit keeps what it measured. The
    weights are 64 quantized N(0, 1) rows repeated (quantizing the 7B's 136 M-weight stack
    takes longer than timing it; the bytes streamed are the same)."""
    from gguf import GGMLQuantizationType as T

    from qvl.convert.quant import quantize
    from qvl.kernels.qmatmul import qmatmul

    def log(row: dict) -> dict:
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    weights = []
    for qtype, n, k in cases:
        qt = T[qtype]
        pool = quantize(np.random.default_rng(0).standard_normal((min(n, 64), k)).astype(np.float32), qt)
        weights.append((qt, n, k, torch.from_numpy(pool[np.arange(n) % len(pool)]).to(dev)))
    rows = []
    for qt, n, k, raw in weights:
        x = torch.randn(1, k, device=dev)
        ref = qmatmul(x, raw, qt, n, k, block_n=16, num_warps=4)
        found = []  # (ms, (block_n, warps, prefetch, split), row)

        def measure(block_n: int, warps: int, ahead: int | None, split: int | None) -> None:
            got = qmatmul(x, raw, qt, n, k, block_n=block_n, num_warps=warps, prefetch=ahead, split_k=split)
            assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), (qt.name, block_n, warps)
            ms = graph_timer(lambda w: lambda: qmatmul(x, w, qt, n, k, block_n=block_n, num_warps=warps,
                                                      prefetch=ahead, split_k=split), raw)
            found.append((ms, (block_n, warps, ahead, split), log(
                {"kernel": f"GEMV {qt.name}", "n": n, "k": k, "block_n": block_n, "num_warps": warps,
                 "prefetch": "default" if ahead is None else ahead, "split_k": split or "default",
                 "ms": round(ms, 4), "weight_GB_s": round(raw.numel() / ms / 1e6, 1)})))

        def best() -> tuple[int, int, int | None, int | None]:
            return min(found, key=lambda f: f[0])[1]  # ties: the first measured

        for block_n in gemv["block_n"]:
            for warps in gemv["num_warps"]:
                measure(block_n, warps, None, None)
        block_n, warps, _, _ = best()
        for ahead in gemv["prefetch"][1:]:
            measure(block_n, warps, ahead, None)
        _, _, ahead, _ = best()
        for split in gemv["split_k"][1:]:
            measure(block_n, warps, ahead, split)
        rows += [row for _, _, row in sorted(found, key=lambda f: f[0])]
    for qt, n, k, raw in weights:
        xb = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        found = []
        for bm, bn, bk, warps in tiles:
            try:
                ms = timer(lambda: qmatmul(xb, raw, qt, n, k, block_m=bm, block_n=bn, block_k=bk, num_warps=warps))
            except Exception as e:  # a tile too large for shared memory / registers on this GPU
                print(f"GEMM {qt.name} {bm}x{bn}x{bk}/{warps}: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            found.append((ms, log({"kernel": f"GEMM {qt.name}", "m": m, "n": n, "k": k, "tiles": [bm, bn, bk],
                                   "num_warps": warps, "ms": round(ms, 4),
                                   "TFLOP_s": round(2 * m * n * k / ms / 1e9, 1)})))
        rows += [row for _, row in sorted(found, key=lambda f: f[0])]
    return rows


# the 7B Q4_K_M decode step's GEMVs (type, rows, columns, SwiGLU): q+k(+v) stacked, v, o, the
# gate/up stack, down (Q4_K or Q6_K: the mix gives some layers' attn_v and ffn_down Q6_K), the output
DECODE_GEMVS = (("Q4_K", 4608, 3584, False), ("Q4_K", 4096, 3584, False), ("Q6_K", 512, 3584, False),
                ("Q4_K", 3584, 3584, False), ("Q4_K", 2 * 18944, 3584, True), ("Q4_K", 3584, 18944, False),
                ("Q6_K", 3584, 18944, False), ("Q6_K", 152064, 3584, False))
SPLITS = (None, 1, 2, 3, 4, 6, 8, 12, 16)


def splits(dev: str, cases=DECODE_GEMVS, choices=SPLITS, graph_timer: GraphTimer = graph_ms) -> list[dict]:
    """Each decode GEMV shape at the default launch (rows a program, warps, prefetch) over K
    splits (None: the default, kernels/qgemv.py's WARPS_PER_CORE): GB/s of weight bytes, each
    shape's rows best first with the default's GB/s beside them. The stacked gate/up rows
    multiply as SwiGLU, as in decode. Weights: 64 quantized rows repeated (as `sweep`)."""
    from gguf import GGMLQuantizationType as T

    from qvl.convert.quant import quantize
    from qvl.kernels.qmatmul import qmatmul

    rows = []
    for qtype, n, k, swiglu in cases:
        qt = T[qtype]
        pool = quantize(np.random.default_rng(0).standard_normal((min(n, 64), k)).astype(np.float32), qt)
        raw = torch.from_numpy(pool[np.arange(n) % len(pool)]).to(dev)
        x = torch.randn(1, k, device=dev)
        found = []
        for split in choices:
            ms = graph_timer(lambda w, split=split: lambda: qmatmul(x, w, qt, n, k, split_k=split, swiglu=swiglu), raw)
            found.append({"kernel": f"GEMV {qtype}{' swiglu' if swiglu else ''}", "n": n, "k": k,
                          "split_k": split or "default", "ms": round(ms, 4),
                          "weight_GB_s": round(raw.numel() / ms / 1e6, 1)})
            print(json.dumps(found[-1]), file=sys.stderr, flush=True)
        default = found[0]["weight_GB_s"]
        rows += [dict(r, default_GB_s=default) for r in sorted(found, key=lambda r: r["ms"])]
    return rows


INT8_SHAPES = ((3584, 3584), (2 * 18944, 3584), (3584, 18944), (2048, 2048), (2 * 11008, 2048), (2048, 11008))
# Q6_K: the 7B Q4_K_M's ffn_down / attn_v in 12 of 28 layers, and its output; Q5_K: Q5_K_M files
INT8_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def int8_gemv(dev: str, shapes=INT8_SHAPES, graph_timer: GraphTimer = graph_ms) -> list[dict]:
    """Q4_K, Q5_K and Q6_K at M = 1: kernels/qgemv_q8.py against qgemv.py's float GEMV at its default
    launch, plain products, both replayed from a CUDA graph over copies of the weight, GB/s of
    weight bytes; and the int8 result's error against the float one relative to its max |y|
    (x's rounding). x's int8 form is made once, before the timing (q8_activations.recall), as on
    the decode step, where the kernel that writes x writes it: the GEMV's launch alone is timed."""
    from gguf import GGMLQuantizationType as T

    from qvl.convert.quant import quantize
    from qvl.kernels.qgemv_q8 import qgemv_q8
    from qvl.kernels.qmatmul import qmatmul

    rows = []
    for name in INT8_TYPES:
        qt = T[name]
        for n, k in shapes:
            pool = quantize(np.random.default_rng(0).standard_normal((min(n, 64), k)).astype(np.float32), qt)
            raw = torch.from_numpy(pool[np.arange(n) % len(pool)]).to(dev)
            x = torch.randn(1, k, device=dev)
            exact = qmatmul(x, raw, qt, n, k)
            err = ((qgemv_q8(x, raw, qt, n, k)[0] - exact).abs().max() / exact.abs().max()).item()
            ms_float = graph_timer(lambda w, qt=qt: lambda: qmatmul(x, w, qt, n, k), raw)
            ms_int8 = graph_timer(lambda w, qt=qt: lambda: qgemv_q8(x, w, qt, n, k), raw)
            row = {"kernel": f"GEMV {name} int8 x", "n": n, "k": k, "ms": round(ms_int8, 4),
                   "weight_GB_s": round(raw.numel() / ms_int8 / 1e6, 1), "float_ms": round(ms_float, 4),
                   "vs_float": round(ms_float / ms_int8, 2), "rel_err_vs_float": float(f"{err:.2e}")}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (the kernels run interpreted on the CPU only for tests)")
    import triton.testing

    dev = "cuda"
    buf = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    copy_ms = triton.testing.do_bench(lambda: buf.clone())
    copy_gbs = 2 * buf.numel() / copy_ms / 1e6
    if "--sweep" in sys.argv[1:]:
        rows = sweep(dev, triton.testing.do_bench)
    elif "--int8" in sys.argv[1:]:
        rows = int8_gemv(dev)
    elif "--splits" in sys.argv[1:]:
        rows = splits(dev)
    elif "--quick" in sys.argv[1:]:
        rows = bench_qmatmul(dev, triton.testing.do_bench, {"7b": QMATMUL_SHAPES["7b"]}, ms_=(1,),
                             types=("Q4_K", "Q6_K"))
    elif "--low-bit" in sys.argv[1:]:
        rows = bench_qmatmul(dev, triton.testing.do_bench, QMATMUL_SHAPES, ms_=(1,), types=LOW_BIT_TYPES)
    else:
        rows = bench_qmatmul(dev, triton.testing.do_bench, QMATMUL_SHAPES)
        rows += bench_attention(dev, triton.testing.do_bench)
        rows += bench_decode_attention(dev)
        rows += bench_rope_norm(dev, triton.testing.do_bench)
    for row in rows:
        moved = row.get("weight_GB_s", row.get("GB_s"))
        if moved is not None:
            row["pct_copy_bw"] = round(100 * moved / copy_gbs, 1)
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GB_s": round(copy_gbs, 1), "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
