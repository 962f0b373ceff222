#!/usr/bin/env python3
"""Each kernel once at the models' shapes on a CUDA GPU, against its torch reference, each case
in a process of its own: an illegal memory access poisons the CUDA context of the process it
happens in, so one bad launch would otherwise fail every later case. The cases run with
CUDA_LAUNCH_BLOCKING=1, so an error names the launch that made it. One JSON line per case:
{"case", "ok", "max_err" (relative to the reference's largest magnitude), "error"}.

Attention is tried with several launch parameters (block_m, block_n, num_warps, num_stages),
so that a session on a lent GPU learns which ones run when the defaults do not.

    python scripts/check_gpu_kernels.py                    # every case, eight at a time
    python scripts/check_gpu_kernels.py --case NAME        # one case, in this process
    python scripts/check_gpu_kernels.py --sanitize NAME    # one case under compute-sanitizer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ATTENTION_LAUNCHES = {"default": None, "64x64w8": (64, 64, 8, 1), "32x32w4": (32, 32, 4, 1),
                      "64x64w4s2": (64, 64, 4, 2), "128x64w8": (128, 64, 8, 1)}
WINDOWS = [64] * 40 + [32, 16, 48, 64]  # a window layer: full 8 x 8 windows and the image edge's smaller ones
GEMV_NK = [3584, 3584]  # the GEMV cases' weight (n, k): the 7B's q / o projection
TOL = {"bf16": 2e-2, "f32": 1e-4}  # of max |ref|: bf16 operands and probabilities / float32 products
DEVICE = "cuda"  # where the kernels run (the tests run the cases in Triton's interpreter on the CPU)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| over max |ref|, got brought back from DEVICE (after its work finished)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return ((got.cpu() - ref).abs().max() / ref.abs().max()).item()


def _attention_case(segs: list[int], heads: int, kv_heads: int, d: int, causal: bool, launch: tuple | None,
                    dtype: torch.dtype) -> Callable[[], float]:
    def run() -> float:
        from qvl.kernels.attention import attention, attention_ref

        g = torch.Generator().manual_seed(0)
        cu = [0]
        for s in segs:
            cu.append(cu[-1] + s)
        q, k, v = (torch.randn(cu[-1], h, d, generator=g) for h in (heads, kv_heads, kv_heads))
        bm, bn, warps, stages = launch or (None, None, None, None)
        got = attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cu, cu, causal, dtype=dtype, block_m=bm,
                        block_n=bn, num_warps=warps, num_stages=stages)
        return _relative_error(got, attention_ref(q, k, v, cu, cu, causal))
    return run


def _qmatmul_case(qtype: str, m: int, n: int, k: int) -> Callable[[], float]:
    def run() -> float:
        from gguf import GGMLQuantizationType as T

        from qvl.convert.quant import dequantize
        from qvl.kernels.qmatmul import qmatmul

        sys.path.insert(0, str(REPO / "tests"))
        from quant_weights import quant_weights

        qt = T[qtype]
        raw = quant_weights(n, k, qt, "normal", seed=0)
        dense = torch.from_numpy(dequantize(raw.numpy(), qt).reshape(n, k))
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
        xd = x.to(DEVICE) if m <= 8 else x.to(DEVICE, torch.bfloat16)
        got = qmatmul(xd, raw.to(DEVICE), qt, n, k)
        return _relative_error(got, xd.float().cpu() @ dense.T)
    return run


def _embed_row_case(qtype: str) -> Callable[[], float]:
    """decode_inputs.embed_row of a 7B-wide row from a page-locked host table (what
    DecodeGraph reads on a GPU: the kernel reads host memory over the bus), token id on DEVICE."""
    def run() -> float:
        from gguf import GGMLQuantizationType as T

        from qvl.kernels.decode_inputs import embed_row, embed_row_ref

        sys.path.insert(0, str(REPO / "tests"))
        from quant_weights import quant_weights

        qt = T[qtype]
        raw = quant_weights(64, 3584, qt, "normal", seed=0)
        table = raw.pin_memory() if DEVICE == "cuda" else raw
        out = torch.zeros(1, 3584, device=DEVICE)
        embed_row(table, qt, 3584, torch.tensor([37], device=DEVICE), out)
        return _relative_error(out[0], embed_row_ref(raw.numpy(), qt, 37))
    return run


def _int8_gemv_case(qtype: str) -> Callable[[], float]:
    """qgemv_q8 (dp4a: inline assembly a GPU alone runs) against its float64 reference."""
    def run() -> float:
        from qvl.kernels.qgemv_q8 import qgemv_q8, qgemv_q8_ref

        sys.path.insert(0, str(REPO / "tests"))
        from gguf import GGMLQuantizationType as T
        from quant_weights import quant_weights

        n, k = GEMV_NK
        raw = quant_weights(n, k, T[qtype], "normal", seed=0)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
        got = qgemv_q8(x.to(DEVICE), raw.to(DEVICE), T[qtype], n, k)[0]
        return _relative_error(got, qgemv_q8_ref(x, raw.numpy(), T[qtype]).float())
    return run


def cases() -> dict[str, tuple[Callable[[], float], float]]:
    """name -> (run, tolerance)."""
    out: dict[str, tuple[Callable[[], float], float]] = {}
    for name, launch in ATTENTION_LAUNCHES.items():
        out[f"attention vision d80 bf16 {name}"] = (
            _attention_case(WINDOWS, 16, 16, 80, False, launch, torch.bfloat16), TOL["bf16"])
        out[f"attention text d128 GQA 28/4 causal bf16 {name}"] = (
            _attention_case([300, 77], 28, 4, 128, True, launch, torch.bfloat16), TOL["bf16"])
    out["attention vision d64 bf16 default"] = (
        _attention_case(WINDOWS, 16, 16, 64, False, None, torch.bfloat16), TOL["bf16"])
    out["attention vision d80 f32 default"] = (
        _attention_case(WINDOWS, 16, 16, 80, False, None, torch.float32), TOL["f32"])
    for qtype in ("Q4_K", "Q6_K", "Q8_0"):
        out[f"qmatmul {qtype} gemm m=300"] = (_qmatmul_case(qtype, 300, 1024, 3584), TOL["bf16"])
        out[f"qmatmul {qtype} gemv m=3"] = (_qmatmul_case(qtype, 3, *GEMV_NK), TOL["f32"])
        out[f"embedding row {qtype} from page-locked memory"] = (_embed_row_case(qtype), 0.0)  # exact
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        out[f"qgemv_q8 {qtype} int8 x"] = (_int8_gemv_case(qtype), TOL["f32"])
    return out


def run_one(name: str) -> dict:
    run, tol = cases()[name]
    try:
        err = run()
    except Exception as e:  # the case's outcome, reported: the next case runs regardless
        return {"case": name, "ok": False, "max_err": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"case": name, "ok": err <= tol, "max_err": err, "error": None}


def _subprocess(name: str, sanitize: bool = False) -> dict:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    cmd = [sys.executable, __file__, "--case", name]
    if sanitize:
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "5", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240 if sanitize else 120)
    except subprocess.TimeoutExpired:
        return {"case": name, "ok": False, "max_err": None, "error": "timed out"}
    if sanitize:
        return {"case": name, "sanitizer": (proc.stdout + proc.stderr)[-3000:]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"case": name, "ok": False, "max_err": None, "error": f"exit {proc.returncode}: {proc.stderr[-400:]}"}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="run this case here")
    parser.add_argument("--sanitize", help="run this case under compute-sanitizer's memcheck")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_gpu_kernels.py needs a CUDA GPU (the CI runs the kernels interpreted)")
    if args.case:
        print(json.dumps(run_one(args.case)), flush=True)
        return 0
    if args.sanitize:
        print(json.dumps(_subprocess(args.sanitize, sanitize=True)), flush=True)
        return 0
    bad = 0
    with ThreadPoolExecutor(8) as pool:
        for result in pool.map(_subprocess, cases()):
            bad += not result["ok"]
            print(json.dumps(result), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
