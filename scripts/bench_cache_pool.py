#!/usr/bin/env python3
"""Two conversations about two pictures taking turns on one model (two clients of `qvl serve`):
the first one's second turn, with the cache pool (`qvl serve --cache-pool`, runtime/cache_pool.py)
and, as the baseline in the same run on the same loaded model, without it.

Prints each turn's vision ms, prefill seconds and prompt tokens read from the cache, and the
ratio of the second turn's times to its first token (vision + prefill).

    python scripts/bench_cache_pool.py /tmp/q3b-q4_k_m.gguf --image-size 1024x1024
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from qvl.runtime.cache_pool import CachePool
from qvl.runtime.loader import load


def turn(model, picture, first_answer, tokens, label):
    messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                             {"type": "text", "text": "What is on this page?"}]}]
    if first_answer is not None:
        messages += [{"role": "assistant", "content": first_answer}, {"role": "user", "content": "Who wrote it?"}]
    g = model.chat(messages, max_new_tokens=tokens)
    first = g.timings.get("vision_ms", 0) / 1e3 + g.timings["prefill_s"]
    print(f"{label:34} vision {g.timings.get('vision_ms', 0) / 1e3:6.2f} s  prefill {g.timings['prefill_s']:6.2f} s  "
          f"prompt {g.prompt_tokens} tokens, {g.reused_tokens} from a cache")
    return g, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--image-size", default="1024x1024")
    p.add_argument("-n", type=int, default=4, help="Tokens each answer.")
    args = p.parse_args()
    w, h = (int(v) for v in args.image_size.split("x"))
    a, b = (Image.fromarray(np.random.default_rng(s).integers(0, 256, (h, w, 3), dtype=np.uint8)) for s in (1, 2))
    model = load(args.model, device="cpu")
    times = {}
    for pooled in (True, False):
        model.cache_pool = CachePool(4 << 30) if pooled else None
        tag = "pool" if pooled else "no pool"
        a1, _ = turn(model, a, None, args.n, f"[{tag}] A, first turn")
        b1, _ = turn(model, b, None, args.n, f"[{tag}] B, first turn")
        _, times[pooled] = turn(model, a, a1.text, args.n, f"[{tag}] A, second turn")
        if pooled:
            print(f"  pool: {model.cache_pool.nbytes / 2**20:.0f} MiB set aside")
    print(f"A's second turn to its first token: {times[True]:.2f} s with the pool, {times[False]:.2f} s without "
          f"({times[False] / max(times[True], 1e-9):.1f}x)")


if __name__ == "__main__":
    main()
