#!/usr/bin/env python3
"""What the vision cache (runtime/vision_cache.py) saves: a picture asked about a second time
where the KV cache cannot serve (another system prompt before it), with the picture's features
kept, against the same question with the cache emptied first, in the same run. Prints each
answer's vision and prompt seconds and the ratio of the whole answers' times.

    python scripts/bench_vision_cache.py /tmp/q3b-q4_k_m.gguf --size 1008 --tokens 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from qvl.runtime.loader import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="GGUF text model (its mmproj beside it)")
    ap.add_argument("--size", type=int, default=1008, help="the random picture's side in pixels")
    ap.add_argument("--tokens", type=int, default=8, help="tokens each answer generates")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = load(args.model, device=args.device)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))

    def ask(system: str) -> tuple[float, dict[str, float], list[int]]:
        t0 = time.perf_counter()
        g = model.generate("What is in the picture?", [picture], system=system, max_new_tokens=args.tokens)
        return time.perf_counter() - t0, g.timings, g.token_ids

    ask("Warm up.")  # first runs: repacking caches, allocator
    model.vision_cache.clear()
    first = ask("You are a helpful assistant.")
    kept = ask("Answer briefly.")  # other text before the picture: only the features can be reused
    model.vision_cache.clear()
    fresh = ask("Be precise.")  # the same again, the picture encoded
    for name, (total, t, _) in (("first", first), ("second, features kept", kept), ("third, cache emptied", fresh)):
        print(f"{name:24s} total {total:7.2f} s  vision {t.get('vision_ms', 0.0) / 1e3:7.2f} s  "
              f"prefill {t['prefill_s']:6.2f} s  decode {t['decode_s']:6.2f} s")
    print(f"kept / emptied: {kept[0] / fresh[0]:.3f}x the time ({fresh[0] - kept[0]:.2f} s saved)")


if __name__ == "__main__":
    main()
