#!/usr/bin/env python3
"""Kernel timings on a GPU against torch baselines measured in the same run.

For the 3B and 7B shapes: the dequantizing matmul (Q4_K, Q6_K, Q8_0; M = 1 decode and M = 512
prefill) against torch.matmul on the dequantized weight, with achieved GB/s of weight bytes and
% of the measured device-to-device copy bandwidth; attention (vision windows, head dim 80, and
causal prefill) against F.scaled_dot_product_attention. Median of triton.testing.do_bench.
Validates every kernel against its reference before timing it. Needs CUDA.

    python scripts/bench_kernels.py > docs/bench-kernels.json
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (the kernels run interpreted on the CPU only for tests)")
    import triton.testing
    from gguf import GGMLQuantizationType as T

    from qvl.convert.quant import dequantize, quantize
    from qvl.kernels.attention import attention, attention_ref
    from qvl.kernels.qmatmul import qmatmul

    dev = "cuda"
    buf = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    copy_ms = triton.testing.do_bench(lambda: buf.clone())
    copy_gbs = 2 * buf.numel() / copy_ms / 1e6
    rows = []
    shapes = {"3b": [(2048, 2048), (11008, 2048), (2048, 11008)], "7b": [(3584, 3584), (18944, 3584), (3584, 18944)]}
    for model, mats in shapes.items():
        for n, k in mats:
            w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
            for qt in (T.Q4_K, T.Q6_K, T.Q8_0):
                raw = torch.from_numpy(quantize(w, qt)).to(dev)
                dense = torch.from_numpy(dequantize(raw.cpu().numpy(), qt).reshape(n, k)).to(dev)
                for m in (1, 512):
                    x = torch.randn(m, k, device=dev)
                    ref = x @ dense.T
                    got = qmatmul(x, raw, qt, n, k, block_m=16 if m == 1 else 64, block_n=64)
                    assert (got - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
                    ms = triton.testing.do_bench(lambda: qmatmul(x, raw, qt, n, k, block_m=16 if m == 1 else 64,
                                                                 block_n=64))
                    base = triton.testing.do_bench(lambda: x @ dense.T)
                    gbs = raw.numel() / ms / 1e6
                    rows.append({"model": model, "kernel": f"qmatmul {qt.name}", "m": m, "n": n, "k": k,
                                 "ms": round(ms, 4), "weight_GB_s": round(gbs, 1),
                                 "pct_copy_bw": round(100 * gbs / copy_gbs, 1),
                                 "vs_torch_matmul_dequantized": round(base / ms, 2)})
    for name, segs, heads, d, causal in (("vision windows", [64] * 50, 16, 80, False),
                                         ("vision full", [3200], 16, 80, False),
                                         ("text prefill 3b", [2048], 16, 128, True)):
        cu = [0]
        for s in segs:
            cu.append(cu[-1] + s)
        q = torch.randn(cu[-1], heads, d, device=dev)
        kv_heads = 2 if causal else heads
        k = torch.randn(cu[-1], kv_heads, d, device=dev)
        v = torch.randn(cu[-1], kv_heads, d, device=dev)
        ref = attention_ref(q.cpu(), k.cpu(), v.cpu(), cu, cu, causal)
        assert (attention(q, k, v, cu, cu, causal).cpu() - ref).abs().max().item() < 1e-3
        ms = triton.testing.do_bench(lambda: attention(q, k, v, cu, cu, causal, 64, 64))
        kk, vv = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        base = triton.testing.do_bench(lambda: [F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], kk[a:b].transpose(0, 1)[None], vv[a:b].transpose(0, 1)[None],
            is_causal=causal) for a, b in zip(cu[:-1], cu[1:])])
        rows.append({"kernel": f"attention {name}", "ms": round(ms, 4), "vs_sdpa": round(base / ms, 2)})
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GB_s": round(copy_gbs, 1), "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
