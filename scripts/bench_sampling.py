#!/usr/bin/env python3
"""Time a token's draw from Qwen's 152,064 logits: runtime/sampling.sample against the sampler
as first written (`full_vocab_distribution` + a multinomial draw: it sorts the whole vocabulary
for top-p and draws over all of it), measured in the same run on random logits.

    python scripts/bench_sampling.py --repeat 30 [--device cuda]

One line a parameter set: milliseconds a draw (median) for each, and the ratio. The sorted
version is also the tests' oracle for which tokens the filters keep (tests/runtime/test_sampling.py).
Then llama.cpp's other samplers (typical, top-n-sigma, XTC, dynamic temperature, DRY without
sequence breakers, mirostat), each against llama.cpp's default chain timed in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qvl.runtime.sampler_chain import ORDER_LLAMACPP, ChainOptions
from qvl.runtime.sampling import SamplingParams, apply_repeat_penalty, sample

VOCAB = 152_064
CASES = {
    "temperature 0.8": SamplingParams(temperature=0.8),
    "top-k 40": SamplingParams(temperature=0.8, top_k=40),
    "top-p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "llama.cpp's defaults": SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1),
}
LLAMACPP = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1,
                          chain=ChainOptions(ORDER_LLAMACPP))
# llama.cpp's other samplers (sampler_chain.py), each over the whole vocabulary after the temperature
EXTRA = {
    "typical 0.95": ChainOptions(typical_p=0.95),
    "top-n-sigma 1.5": ChainOptions(top_n_sigma=1.5),
    "xtc 1.0 / 0.001": ChainOptions(xtc_probability=1.0, xtc_threshold=0.001),
    "dynatemp 0.5": ChainOptions(dynatemp_range=0.5),
    "dry 0.8, last 64": ChainOptions(dry_multiplier=0.8),
    "mirostat 1": ChainOptions(mirostat=1),
    "mirostat 2": ChainOptions(mirostat=2),
}


def full_vocab_distribution(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """The filters (non-greedy `p`) as first written, over the whole vocabulary sorted:
    probabilities (vocab,), zero where a filter drops the token."""
    recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history if p.repeat_last_n == -1 else []
    logits = apply_repeat_penalty(logits.float(), recent, p.repeat_penalty)
    logits = logits / p.temperature
    if p.top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, p.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p is not None and p.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p
        keep[0] = True
        probs = torch.where(torch.zeros_like(probs, dtype=torch.bool).index_fill(0, order[keep], True), probs, 0.0)
    if p.min_p:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    return probs


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30, help="draws timed per sampler and case (median reported)")
    ap.add_argument("--device", default="cpu", help="the logits' device: cpu or cuda (a draw reads its token back)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(VOCAB, generator=gen) * 2).to(args.device)
    history = torch.randint(0, VOCAB, (64,), generator=gen).tolist()
    drawn = torch.Generator(device=args.device).manual_seed(0)  # the first sampler's multinomial, on the device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary {VOCAB}, logits on {args.device}")
    for name, p in CASES.items():
        ours = median_ms(lambda: sample(logits, history, p, gen), args.repeat)
        first = median_ms(lambda: int(torch.multinomial(full_vocab_distribution(logits, history, p), 1,
                                                        generator=drawn)), args.repeat)
        print(f"{name:22s} sample {ours:8.3f} ms   full vocabulary {first:8.3f} ms   {first / ours:6.1f}x")
    base = median_ms(lambda: sample(logits, history, LLAMACPP, gen), args.repeat)
    print(f"llama.cpp's defaults in its order (temperature last): {base:.3f} ms; its other samplers, alone at "
          "temperature 0.8 (x: over those defaults' time):")
    repeats = (history[:20] * 4)[:64]  # DRY: a history that repeats itself
    for name, chain in EXTRA.items():
        p = SamplingParams(temperature=0.8, chain=chain)
        ms = median_ms(lambda: sample(logits, repeats, p, torch.Generator().manual_seed(1)), args.repeat)
        print(f"{name:22s} sample {ms:8.3f} ms   {ms / base:6.2f}x")


if __name__ == "__main__":
    main()
