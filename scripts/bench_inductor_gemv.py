#!/usr/bin/env python3
"""Is torch.compile (inductor's C++ code on the CPU) a faster route for the batch-1 4-bit GEMV
than torch's int4 op? Times a Q4_0-style GEMV (two codes a byte, one scale per 32 weights)
written in torch ops and compiled two ways, against `_weight_int4pack_mm_for_cpu` in the same
run, as G weights/s and the ratio to the int4 op. Needs a C++ compiler (inductor's).

    python scripts/bench_inductor_gemv.py            # 11008 x 2048, the 3B's gate/up
    python scripts/bench_inductor_gemv.py 3584 18944
"""

from __future__ import annotations

import json
import sys

import torch

from bench_packed import _time  # one warm-up call, then the mean of `repeat`


def main() -> None:
    n, k = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (11008, 2048)
    torch.manual_seed(0)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)  # byte j of a 64-weight group: codes j and j + 32
    d = torch.rand(n, k // 32) * 0.01
    x = torch.randn(k)

    def fused(x, w, d):  # per 32-weight block: sum(x * q), then the scale and the -8 offset once
        lo = (w & 15).view(n, k // 64, 32).float()
        hi = (w >> 4).view(n, k // 64, 32).float()
        xs = x.view(k // 64, 2, 32)
        s = torch.stack([(lo * xs[:, 0]).sum(-1), (hi * xs[:, 1]).sum(-1)], -1).view(n, k // 32)
        return (d * (s - 8 * x.view(k // 32, 32).sum(-1))).sum(-1)

    def dequantized(x, w, d):  # every weight as a float, then one reduction over k
        lo = (w & 15).view(n, k // 64, 32).float()
        hi = (w >> 4).view(n, k // 64, 32).float()
        q = torch.cat([lo, hi], -1).view(n, k // 32, 32) - 8
        return ((q * d[:, :, None]).view(n, k) * x).sum(-1)

    ref = fused(x, w, d)
    rows = {}
    for name, fn in (("inductor fused", fused), ("inductor dequantized", dequantized)):
        compiled = torch.compile(fn, dynamic=False)
        got = compiled(x, w, d)
        assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), name
        rows[name] = _time(lambda: compiled(x, w, d), 20)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    scales_zeros = torch.rand(k // 32, n, 2).bfloat16()
    xb = x.bfloat16()[None]
    rows["int4 op"] = _time(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, scales_zeros), 20)
    base = rows["int4 op"]
    print(json.dumps({"n": n, "k": k, "threads": torch.get_num_threads(),
                      "rows": [{"gemv": name, "ms": round(s * 1e3, 3), "G_weights_s": round(n * k / s / 1e9, 2),
                                "time_vs_int4_op": round(s / base, 2)} for name, s in rows.items()]}, indent=1))


if __name__ == "__main__":
    main()
