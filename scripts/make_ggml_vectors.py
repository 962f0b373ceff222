#!/usr/bin/env python3
"""Write tests/convert/ggml-extra-vectors.npz: the bytes ggml's own quantizers make of the shared
fixture's rows where the shared fixture has none: with an importance matrix (every type qvl
writes) and, for Q3_K, Q2_K, IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_S and IQ1_M, without one too
(IQ2_XXS, IQ2_XS and IQ1_S exist only with one); and for the grid types, eight rows with all-zero
runs of 16 weights (the first two also with runs of equal values: IQ1's sort keeps their order).

ggml's `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)` is called through
ctypes from a libggml-base built from llama.cpp's sources (llama-cpp-python 0.3.36's sdist:
`cmake -B build -DGGML_NATIVE=OFF && cmake --build build --target ggml-base`). The library is
first checked against the shared fixture's bytes without an importance matrix (the same build of
the reference quantizers). Two importance matrices over the 512 columns: log-normal values, and
the same with every eighth column 0 and three columns a million times larger; half of the rows
(8 of each kind) take each.

    python scripts/make_ggml_vectors.py --lib llama.cpp/build/bin/libggml-base.so
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "fixtures" / "ggml-quant-vectors.npz"
OUT = REPO / "tests" / "convert" / "ggml-extra-vectors.npz"
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q3_K": 11, "Q2_K": 10,
         "IQ4_NL": 20, "IQ4_XS": 23, "IQ3_XXS": 18, "IQ3_S": 21, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ2_S": 22,
         "IQ1_S": 19, "IQ1_M": 29}
BLOCK = {"Q3_K": 110, "Q2_K": 84, "IQ4_NL": 144, "IQ4_XS": 136, "IQ3_XXS": 98, "IQ3_S": 110, "IQ2_XXS": 66,
         "IQ2_XS": 74, "IQ2_S": 82, "IQ1_S": 50, "IQ1_M": 56}  # bytes a 256 elements take, where the shared fixture has none
GRID = ("IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
WEIGHTED_ONLY = ("IQ2_XXS", "IQ2_XS", "IQ1_S")  # ggml quantizes these only with an importance matrix
PER_KIND = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", required=True, help="libggml-base.so built from llama.cpp's sources")
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    lib = ctypes.CDLL(a.lib)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def ggml(rows: np.ndarray, t: int, n_bytes: int, imatrix: np.ndarray | None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, np.float32)
        out = np.zeros((rows.shape[0], n_bytes), np.uint8)
        lib.ggml_quantize_chunk(t, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1],
                                None if imatrix is None else np.ascontiguousarray(imatrix, np.float32).ctypes.data)
        return out

    shared = np.load(a.shared)
    x = shared["input"]
    width = {name: shared[name].shape[1] if name in shared else x.shape[1] // 256 * BLOCK[name] for name in TYPES}
    for name, t in TYPES.items():  # the library is the reference the shared bytes came from
        if name in shared and not (ggml(x, t, width[name], None) == shared[name]).all():
            raise SystemExit(f"{a.lib}: its {name} without an importance matrix is not the shared fixture's")
    kinds = shared["kind"]
    rows = np.concatenate([np.flatnonzero(kinds == k)[:PER_KIND] for k in sorted(set(kinds.tolist()))])
    rng = np.random.default_rng(20261206)
    first = np.exp(rng.normal(0, 1.5, x.shape[1])).astype(np.float32)
    second = first.copy()
    second[::8] = 0
    second[[5, 77, 300]] *= 1e6
    imatrix = np.stack([first, second])
    which = np.tile(np.repeat([0, 1], PER_KIND // 2), len(rows) // PER_KIND)
    out = {"rows": rows, "imatrix": imatrix, "which": which}
    for name, t in TYPES.items():
        got = np.zeros((len(rows), width[name]), np.uint8)
        for m in (0, 1):
            got[which == m] = ggml(x[rows[which == m]], t, width[name], imatrix[m])
        out[name] = got
        if name in WEIGHTED_ONLY:
            continue
        plain = shared[name][rows] if name in shared else ggml(x[rows], t, width[name], None)
        if name not in shared:
            out[f"{name}_plain"] = plain
        print(f"{name}: {int((got != plain).any(axis=1).sum())} of {len(rows)} rows differ from "
              "the bytes without an importance matrix")
    # rows with all-zero 16-weight runs inside live blocks (the grid types' dead sub-blocks; IQ3_S's
    # shift its qs and signs), with the first matrix and without
    holes = np.random.default_rng(5).normal(0, 1, (8, x.shape[1])).astype(np.float32)
    for r in range(len(holes)):
        for k in np.random.default_rng(r).choice(x.shape[1] // 16, 6 + r, replace=False):
            holes[r, 16 * k:16 * k + 16] = 0
    holes[0, :8] = holes[0, 8:16]
    holes[1, 100:140] = 0.5
    out["holes"] = holes
    for name in GRID:
        out[f"{name}_holes"] = ggml(holes, TYPES[name], width[name], imatrix[0])
        if name not in WEIGHTED_ONLY:
            out[f"{name}_holes_plain"] = ggml(holes, TYPES[name], width[name], None)
    np.savez_compressed(a.out, **out)
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
