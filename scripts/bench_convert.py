#!/usr/bin/env python3
"""Time `qvl-convert --type q4_k_m` on a checkpoint: seconds, peak RSS, GB/s of input.

The conversion runs in a child process so that its peak RSS (ru_maxrss of the child) is its
own. Make a checkpoint first with scripts/make_random_checkpoint.py, e.g.

    python scripts/make_random_checkpoint.py qwen2.5-vl-3b /tmp/q3b
    python scripts/bench_convert.py /tmp/q3b

For reference on this 2-core machine (issue 2): llama.cpp's convert_hf_to_gguf.py to F16 and
then llama-quantize Q4_K_M takes about 245 s and 2.2 GB for the 3B model, plus a 6 GB
intermediate file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--out-dir", type=Path, default=None, help="where to write (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    args = ap.parse_args()

    src_bytes = sum(p.stat().st_size for p in args.checkpoint.glob("*.safetensors"))
    out_dir = Path(tempfile.mkdtemp(dir=args.out_dir))
    out = out_dir / "bench.gguf"
    cmd = [sys.executable, "-m", "qvl.convert", str(args.checkpoint), "-o", str(out), "--type", args.type, "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    seconds = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        sys.exit(f"qvl-convert failed with exit code {proc.returncode}")
    out_bytes = out.stat().st_size + (out_dir / f"mmproj-{out.name}").stat().st_size
    result = {
        "checkpoint": str(args.checkpoint),
        "type": args.type,
        "cpus": os.cpu_count(),
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "input_gib": round(src_bytes / 2**30, 2),
        "output_gib": round(out_bytes / 2**30, 2),
        "input_gb_per_s": round(src_bytes / 1e9 / seconds, 3),
        "vs_llama_cpp_245s": round(245 / seconds, 2),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        for p in out_dir.iterdir():
            p.unlink()
        out_dir.rmdir()


if __name__ == "__main__":
    main()
