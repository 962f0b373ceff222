"""The CPU's two ways to multiply by int4-packed weights (runtime/packed.py), timed per rows of x.

    python scripts/bench_packed.py [--threads 2] [--model 3b] [--types Q4_K,Q6_K,Q8_0,F16]

For each type and each matrix shape of the model's decoder, the int4 op
(`torch._weight_int4pack_mm_for_cpu`; for F16 / BF16 weights, their bf16 GEMM) against decoding
TILE_ROWS-row tiles and running GEMMs on them, in the CPU's GEMM type (runtime/cpu_gemm.py: bf16
where native, else float32; QVL_CPU_BF16=0/1 forces one), for M = 1 .. 1024 rows of x, and the
dense GEMM on a weight decoded beforehand as the bound. Prints a JSON line per case; `tiled /
int4` below 1 means the tiles win: packed.DENSE_FROM_M (DENSE_FROM_M_F32, DENSE_TILES_FROM_M)
should be the first M where they do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

from qvl.runtime.packed import PackedMatrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from quant_weights import quant_weights  # noqa: E402  (qvl's quantizers; Q2_K / Q3_K: random blocks)

SHAPES = {  # (rows, cols) of the decoder's matrices: attn_q/o, ffn_gate/up, ffn_down
    "3b": [(2048, 2048), (11008, 2048), (2048, 11008)],
    "7b": [(3584, 3584), (18944, 3584), (3584, 18944)],
}


def _time(f, repeat: int) -> float:
    f()
    start = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=list(SHAPES), default="3b")
    ap.add_argument("--types", default="Q4_K,Q6_K")
    ap.add_argument("--m", default="1,16,64,96,128,192,256,512,1024")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.types.split(","):
        qtype = T[name]
        for rows, cols in SHAPES[args.model]:
            packed = PackedMatrix(qtype, quant_weights(rows, cols, qtype, "normal", seed=0).numpy(), rows, cols)
            total = packed.padded_rows
            dense = torch.cat([packed.tile(s, min(s + 1024, total)) for s in range(0, total, 1024)])
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, cols).to(torch.bfloat16)
                repeat = max(1, min(20, int(2e9 / (m * rows * cols))))
                if packed.int4:
                    int4 = _time(lambda: packed.int4_product(x), repeat)
                else:  # bf16 weights: their bf16 GEMM
                    int4 = _time(lambda: x @ packed.dense.T, repeat)
                tiled = _time(lambda: packed.tiled_product(x), repeat)
                xd = x.to(dense.dtype)
                bound = _time(lambda: xd @ dense.T, repeat)
                print(json.dumps({"type": name, "rows": rows, "cols": cols, "m": m, "int4_ms": round(1e3 * int4, 2),
                                  "tiled_ms": round(1e3 * tiled, 2), "dense_ms": round(1e3 * bound, 2), "gemm": str(dense.dtype)[6:],
                                  "tiled / int4": round(tiled / int4, 3), "uses": "tiled" if m >= packed.tiles_from_m() else "int4"}),
                      flush=True)


if __name__ == "__main__":
    main()
