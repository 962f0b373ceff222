#!/usr/bin/env python3
"""Embeddings of many short texts: side by side in packed passes (embed_api.embeddings_of, what
/api/embed and /v1/embeddings do) against one text a pass (Model.token_hidden each, as before),
in the same run on the same loaded model, with the largest difference between the two vectors.

    python scripts/bench_embed.py /tmp/q3b-q4_k_m.gguf --texts 32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qvl.runtime.embed_api import PACK_TOKENS, embeddings_of
from qvl.runtime.loader import load

WORDS = ("the quick brown fox jumps over a lazy dog while rain falls on the old stone bridge near "
         "our quiet village and children laugh as they run home before dark").split()


def texts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a text model GGUF")
    ap.add_argument("--texts", type=int, default=32, help="how many texts (6-19 words each)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--float32", action="store_true", help="float32 matmuls throughout (load's dtype), not bf16")
    args = ap.parse_args()
    model = load(args.model, device=args.device, dtype=torch.float32 if args.float32 else torch.bfloat16)
    ids = [model.tokenize(t, [])[0] for t in texts(args.texts)]
    n_tokens = sum(map(len, ids))
    embeddings_of(model, ids[:2])  # warm-up: first-call allocations and kernel builds
    model.token_hidden(ids[0])

    t0 = time.perf_counter()
    packed = embeddings_of(model, ids)
    t_packed = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [torch.cat(model.token_hidden(one))[-1].float().cpu().numpy() for one in ids]
    t_alone = time.perf_counter() - t0
    diff = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(packed, alone))
    print(f"{args.model}: {len(ids)} texts, {n_tokens} tokens, packs of up to {PACK_TOKENS} tokens")
    print(f"one text a pass: {t_alone:.2f} s ({len(ids) / t_alone:.1f} texts/s)")
    print(f"packed:          {t_packed:.2f} s ({len(ids) / t_packed:.1f} texts/s)")
    print(f"speed-up {t_alone / t_packed:.2f}x; largest difference {diff:.2e} of the largest |value|")


if __name__ == "__main__":
    main()
