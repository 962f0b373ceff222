#!/usr/bin/env python3
"""Throughput of each quantizer on one core, against gguf-py's Q8_0 and numpy's F16 cast.

Rows are 4096 wide (a 3B/7B projection), values N(0, 1). Prints elements per second and the
ratio to the F16 cast measured in the same run.

    python scripts/bench_quant.py
"""

from __future__ import annotations

import time

import numpy as np
from gguf.quants import quantize as gguf_quantize

from qvl.convert.quant import T, quantize


def best_of(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    x = np.random.default_rng(0).standard_normal((512, 4096)).astype(np.float32)
    base = best_of(lambda: x.astype(np.float16))
    print(f"{'type':<14}{'Melem/s':>10}{'x F16 cast':>12}")
    print(f"{'F16 cast':<14}{x.size / base / 1e6:>10.1f}{1.0:>12.2f}")
    dt = best_of(lambda: gguf_quantize(x, T.Q8_0))
    print(f"{'gguf-py Q8_0':<14}{x.size / dt / 1e6:>10.1f}{base / dt:>12.3f}")
    for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K):
        dt = best_of(lambda: quantize(x, t))
        print(f"{t.name:<14}{x.size / dt / 1e6:>10.1f}{base / dt:>12.3f}")


if __name__ == "__main__":
    main()
