#!/usr/bin/env python3
"""Time `qvl-convert --type q4_k_m` on a checkpoint: seconds, peak RSS, GB/s of input.

The conversion runs in a child process so that its peak RSS (ru_maxrss of the child) is its
own. Make a checkpoint first with scripts/make_random_checkpoint.py, e.g.

    python scripts/make_random_checkpoint.py qwen2.5-vl-3b /tmp/q3b
    python scripts/bench_convert.py /tmp/q3b

For reference on this 2-core machine (issue 2): llama.cpp's convert_hf_to_gguf.py to F16 and
then llama-quantize Q4_K_M takes about 245 s and 2.2 GB for the 3B model, plus a 6 GB
intermediate file.

With --lora-rank R a random PEFT LoRA adapter of rank R on every linear layer of the text model
(LLaMA-Factory's `lora_target: all` with the vision tower frozen) is written beside the output,
and the conversion is timed again with `--lora` merging it: the ratio is the merge's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--out-dir", type=Path, default=None, help="where to write (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the output files")
    ap.add_argument("--lora-rank", type=int, default=0, help="also time merging a random LoRA adapter of this rank")
    args = ap.parse_args()

    src_bytes = sum(p.stat().st_size for p in args.checkpoint.glob("*.safetensors"))
    out_dir = Path(tempfile.mkdtemp(dir=args.out_dir))
    runs = [("plain", [])]
    if args.lora_rank:
        runs.append((f"lora rank {args.lora_rank}", ["--lora", str(write_adapter(args.checkpoint, out_dir / "adapter",
                                                                             args.lora_rank))]))
    results = []
    for label, extra in runs:
        out = out_dir / "bench.gguf"
        cmd = [sys.executable, "-m", "qvl.convert", str(args.checkpoint), "-o", str(out), "--type", args.type, "-q",
               "--force", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        seconds = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child's so far
        if proc.returncode != 0:
            sys.exit(f"qvl-convert failed with exit code {proc.returncode}")
        out_bytes = out.stat().st_size + (out_dir / f"mmproj-{out.name}").stat().st_size
        results.append({
            "run": label,
            "checkpoint": str(args.checkpoint),
            "type": args.type,
            "cpus": os.cpu_count(),
            "seconds": round(seconds, 1),
            "peak_rss_gib": round(peak_kib / 2**20, 2),
            "input_gib": round(src_bytes / 2**30, 2),
            "output_gib": round(out_bytes / 2**30, 2),
            "input_gb_per_s": round(src_bytes / 1e9 / seconds, 3),
            "vs_llama_cpp_245s": round(245 / seconds, 2),
        })
        print(json.dumps(results[-1], indent=2), flush=True)
    if len(results) == 2:
        print(f"merging the adapter: {results[1]['seconds'] / results[0]['seconds']:.2f}x the plain conversion's time")
    if not args.keep:
        shutil.rmtree(out_dir)


def write_adapter(checkpoint: Path, folder: Path, rank: int) -> Path:
    """A random PEFT LoRA folder (rank `rank`, alpha 2 rank) on the text model's linear layers."""
    from safetensors.numpy import save_file

    from qvl.convert.safetensors_io import Checkpoint

    ckpt = Checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    tensors, modules = {}, set()
    try:
        for name in ckpt.names():
            if name.startswith("model.layers.") and name.endswith("proj.weight"):
                out_dim, in_dim = ckpt.shape(name)
                module = name[:-len(".weight")]
                modules.add(module.split(".")[-1])
                key = "base_model.model." + module
                tensors[key + ".lora_A.weight"] = (rng.standard_normal((rank, in_dim)) * 0.01).astype(np.float32)
                tensors[key + ".lora_B.weight"] = (rng.standard_normal((out_dim, rank)) * 0.01).astype(np.float32)
    finally:
        ckpt.close()
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(modules),
              "use_dora": False, "use_rslora": False, "fan_in_fan_out": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


if __name__ == "__main__":
    main()
