#!/usr/bin/env python3
"""A second question about the same picture, with and without `qvl-run --prompt-cache`.

Each run is a fresh `qvl-run` process (the model loaded each time, as a user's shell runs it):
first one question with --prompt-cache writes the cache; then another question is asked with
the cache and, as the baseline in the same run, without it. Prints each run's wall time, vision
ms and prefill seconds, the cache file's size, and the ratio of the two second questions' times
to the first token (load excluded) and wall times.

    python scripts/bench_prompt_cache.py /tmp/q3b-q4_k_m.gguf --image-size 1024x1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def ask(model: str, image: Path, question: str, tokens: int, cache: Path | None, cpu: bool) -> dict:
    cmd = [sys.executable, "-c", "from qvl.runtime.run_cli import main; main()", model, "--image", str(image), "-p", question,
           "-n", str(tokens), "--ignore-eos", "--json"] + (["--cpu"] if cpu else [])
    if cache is not None:
        cmd += ["--prompt-cache", str(cache)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"qvl-run failed: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    t = out["timings"]
    first = t.get("vision_ms", 0) / 1e3 + t["prefill_s"]
    print(f"{'with cache' if cache else 'no cache':>10}  {question!r:24}  wall {wall:6.2f} s  "
          f"vision {t.get('vision_ms', 0) / 1e3:6.2f} s  prefill {t['prefill_s']:6.2f} s  "
          f"prompt {out['prompt_tokens']} tokens")
    return {"wall": wall, "first": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--image-size", default="1024x1024", help="WxH of the random picture.")
    p.add_argument("-n", type=int, default=8, help="Tokens each answer.")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    w, h = (int(v) for v in args.image_size.split("x"))
    with tempfile.TemporaryDirectory() as d:
        image = Path(d) / "page.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
        cache = Path(d) / "page.kv"
        ask(args.model, image, "What is this page?", args.n, cache, args.cpu)
        size = cache.stat().st_size
        cached = ask(args.model, image, "Who wrote it?", args.n, cache, args.cpu)
        fresh = ask(args.model, image, "Who wrote it?", args.n, None, args.cpu)
    print(f"cache file {size / 2**20:.1f} MiB; the second question with the cache: time to the first token "
          f"{fresh['first'] / max(cached['first'], 1e-9):.1f}x shorter ({cached['first']:.2f} s vs "
          f"{fresh['first']:.2f} s), wall {fresh['wall'] / cached['wall']:.2f}x ({cached['wall']:.2f} s vs "
          f"{fresh['wall']:.2f} s)")


if __name__ == "__main__":
    main()
