#!/usr/bin/env python3
"""Throughput of each quantizer on one core, against gguf-py's Q8_0, numpy's F16 cast and, with
--ggml LIB, ggml's own quantizer of the type (ggml_quantize_chunk through ctypes from a
libggml-base built from llama.cpp's sources, one thread, the same rows).

Rows are 4096 wide (a 3B/7B projection), values N(0, 1); IQ2_XXS and IQ2_XS (which exist only with
an importance matrix) take a matrix of ones, the others none. Prints elements per second and the
ratios to the F16 cast and to ggml measured in the same run.

    python scripts/bench_quant.py [--ggml llama.cpp/build/bin/libggml-base.so] [--rows 512]
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf.quants import quantize as gguf_quantize

from qvl.convert.quant import BLOCK_QUANTIZERS, NEEDS_IMATRIX, T, quantize


def best_of(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if best > 2:  # the grid types: one run says enough
            break
    return best


def ggml_quantizer(path: str):
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def run(x: np.ndarray, t: T, imatrix: np.ndarray | None) -> np.ndarray:
        blk, size = GGML_QUANT_SIZES[t]
        out = np.empty((x.shape[0], x.shape[1] // blk * size), np.uint8)
        lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                None if imatrix is None else imatrix.ctypes.data)
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ggml", help="libggml-base.so built from llama.cpp's sources")
    ap.add_argument("--rows", type=int, default=512)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((a.rows, 4096)).astype(np.float32)
    ones = np.ones(x.shape[1], np.float32)
    ggml = ggml_quantizer(a.ggml) if a.ggml else None
    base = best_of(lambda: x.astype(np.float16))
    print(f"{'type':<14}{'Melem/s':>10}{'x F16 cast':>12}{'x ggml':>9}")
    print(f"{'F16 cast':<14}{x.size / base / 1e6:>10.2f}{1.0:>12.2f}")
    dt = best_of(lambda: gguf_quantize(x, T.Q8_0))
    print(f"{'gguf-py Q8_0':<14}{x.size / dt / 1e6:>10.2f}{base / dt:>12.3f}")
    for t in BLOCK_QUANTIZERS:
        m = ones if t in NEEDS_IMATRIX else None
        quantize(x[:1], t, m)  # the grid types' search tables built outside the timing
        dt = best_of(lambda: quantize(x, t, m))
        line = f"{t.name:<14}{x.size / dt / 1e6:>10.2f}{base / dt:>12.4f}"
        if ggml is not None:
            ggml(x[:1], t, m)  # its too
            theirs = best_of(lambda: ggml(x, t, m))
            if not (ggml(x, t, m) == quantize(x, t, m)).all():
                raise SystemExit(f"{t.name}: ggml's bytes differ from qvl's")
            line += f"{theirs / dt:>9.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
