#!/usr/bin/env python3
"""A second chat turn about a picture with and without prompt reuse (runtime/prompt_cache.py).

Turn 1 asks about an image; turn 2 adds the answer and a follow-up question. Turn 2 runs twice on
the same loaded model: once reading its whole prompt again (`cache_prompt=False`, what qvl did
before, and what a runtime without a prompt cache does), once on the cache turn 1 left. Printed:
each run's prompt tokens, tokens reused, vision and prefill seconds, time to the first token,
and the ratio of the two turn-2 times to first token. Prints one JSON line per run, then the
ratio.

    python scripts/bench_chat.py /tmp/q3b-q4_k_m.gguf --size 1008 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF (its mmproj beside it)")
    ap.add_argument("--size", type=int, default=448, help="square test image side in pixels (default 448)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens each turn generates (default 16)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = ap.parse_args()

    import qvl

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    t0 = time.perf_counter()
    model = qvl.load(args.model, device=args.device)
    print(json.dumps({"load_s": round(time.perf_counter() - t0, 2)}), flush=True)
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "Describe this image in detail."}]}]

    def run(name: str, messages: list, cache_prompt: bool) -> tuple[float, str]:
        """(seconds to the first token, answer) of one turn."""
        t = time.perf_counter()
        out = model.chat(messages, max_new_tokens=args.tokens, cache_prompt=cache_prompt)
        first = out.timings.get("vision_ms", 0.0) / 1e3 + out.timings["prefill_s"]
        print(json.dumps({"run": name, "prompt_tokens": out.prompt_tokens, "reused_tokens": out.reused_tokens,
                          "vision_s": round(out.timings.get("vision_ms", 0.0) / 1e3, 3),
                          "prefill_s": round(out.timings["prefill_s"], 3), "first_token_s": round(first, 3),
                          "decode_tok_s": round(len(out.token_ids) / out.timings["decode_s"], 2)
                          if out.token_ids else None, "total_s": round(time.perf_counter() - t, 2)}), flush=True)
        return first, out.text

    answer = run("turn 1", turn1, cache_prompt=False)[1]
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "What colours stand out?"}]
    whole = run("turn 2, whole prompt read again", turn2, cache_prompt=False)[0]
    run("turn 1 again (fills the cache turn 2 reuses)", turn1, cache_prompt=False)
    reused = run("turn 2 on turn 1's cache", turn2, cache_prompt=True)[0]
    print(json.dumps({"first_token_s_whole": round(whole, 3), "first_token_s_reused": round(reused, 3),
                      "speedup": round(whole / reused, 1)}))


if __name__ == "__main__":
    main()
