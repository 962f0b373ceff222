"""What scoring a prompt (/v1/completions' echo + logprobs, logprobs.prompt_logprobs) costs in
memory and time: every position's logits made at once (Model.prompt_logits, then each token's
log-probability read from them: the baseline) against logits made LOGIT_ROWS positions at a time.
Each way runs in a process of its own, so that its peak resident memory is its own; prints the
peak's growth over the loaded model, the seconds, and the ratios.

    python scripts/bench_echo.py [--words 700] [--top 5]   (the fixtures from ../shared, or QVL_SHARED)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QVL_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures/tiny-qwen2.5-vl/llamacpp/tiny-qwen2.5-vl-f16.gguf"


def one(way: str, words: int, top: int) -> dict[str, float]:
    """In this process: load the model, score the prompt `way`, report peak RSS growth and time."""
    from qvl.runtime import logprobs
    from qvl.runtime.loader import load

    model = load(FIXTURE, device="cpu")
    text = " ".join(f"w{i}" for i in range(words))
    ids = model.tokenize(text, [])[0]
    model.prompt_logits("warm up", template=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if way == "whole":
        logits = model.prompt_logits(text, template=False)
        scores = [logprobs.token_logprob(logits[i - 1], ids[i], top) for i in range(1, len(ids))]
    else:
        scores = logprobs.prompt_logprobs(model, text, top)[1][1:]
    seconds = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"tokens": len(ids), "scored": len(scores), "peak_mib": grown, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=700, help="words of the prompt (about 3.8 tokens each)")
    ap.add_argument("--top", type=int, default=5, help="alternatives a token")
    ap.add_argument("--way", choices=["whole", "sliced"], help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.way:
        print(json.dumps(one(args.way, args.words, args.top)))
        return
    got = {}
    for way in ("whole", "sliced"):
        out = subprocess.run([sys.executable, __file__, "--way", way, "--words", str(args.words),
                              "--top", str(args.top)], check=True, capture_output=True, text=True).stdout
        got[way] = json.loads(out.strip().splitlines()[-1])
        g = got[way]
        print(f"{way:>6}: {g['tokens']} prompt tokens, peak +{g['peak_mib']:.0f} MiB, {g['seconds']:.2f} s")
    w, s = got["whole"], got["sliced"]
    print(f"sliced / whole: memory {s['peak_mib'] / w['peak_mib']:.3f}x, time {s['seconds'] / w['seconds']:.2f}x")


if __name__ == "__main__":
    main()
