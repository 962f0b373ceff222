#!/usr/bin/env python3
"""What self-speculative decoding (--spec-type ngram-simple, ngram-map-k, ngram-mod: runtime/speculative.py)
gains and costs, every figure against plain decoding in the same process:

1. A pass's cost by its tokens: one decoder pass over 1, 2, 3, 4, 5, 8 and 16 tokens after a
   256-token prompt (median of --rounds), as a multiple of the one-token pass. A draft of d tokens
   taken whole gives d + 1 tokens for that multiple.
2. An answer that repeats text: a sentence the prompt holds, written three times (held to the
   sentence's own tokens by a grammar of their ids, so a random-weight model writes it as a
   trained one would), greedy; plain and with drafts at --spec-draft-n-max 3 (the CPU default),
   7 (the GPU default) and 16, and ngram-map-k (size_m 48, its default: a key's match needs 48
   tokens after it, and 8) and ngram-map-k4v (size_m 8) at 3, timed in turns: tok/s, the ratio,
   drafts made and taken, and whether the tokens are the same.
3. An answer whose drafts are all refused: the sentence's first p distinct tokens (p the largest
   prime their number allows) three times, in steps of 1, 2 and 3 (held by a grammar), so that a
   token seen before is followed by another token each time. With size_n 1 every token after the
   first copy is drafted from and the draft refused (what a refused draft costs); with the
   default size_n 12 no 12 tokens recur and nothing is drafted (what looking costs).
4. An answer given before: a paragraph with no run of tokens repeated (held by a grammar), which
   the prompt does not hold, asked for again: ngram-simple finds nothing to draft; ngram-mod
   (llama.cpp's defaults, at --spec-draft-n-max 3) drafts from the table the first asking left
   (asked once untimed, then timed in turns with the others).
5. Drafting's own cost, no model: each drafter's begin and its draft call per token (median, 99th
   percentile, most) over a 500-token answer after a random prompt of 1000 and 8000 tokens, the
   answer copying 200-token stretches of the prompt (--drafting-only: this alone).

    python scripts/bench_speculative.py model-q4_k_m.gguf --tokens 75 --rounds 3 [--device cuda]
    python scripts/bench_speculative.py --drafting-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from qvl.runtime.gbnf import parse_gbnf
from qvl.runtime.loader import load
from qvl.runtime.speculative import SPEC_TYPES, Drafter, Speculation

SENTENCE = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the green valley "
            "below the old stone bridge.\n")
PARAGRAPH = ("Rivers carry sediment from mountains toward the sea, building deltas where currents slow. Farmers "
             "value such plains because floods renew soil each spring, although levees now restrict that gift. "
             "Engineers debate whether controlled releases could restore balance without risking towns.")
PASS_SIZES = (1, 2, 3, 4, 5, 8, 16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def pass_costs(model, rounds: int, device: str) -> dict[int, float]:
    """ms of one pass over n tokens at the end of a 256-token cache, each n."""
    dec = model.decoder
    cache = dec.new_cache(256 + max(PASS_SIZES), model.placement.kv_type)
    emb = dec.embed_tokens(torch.arange(1000, 1256 + max(PASS_SIZES)))
    pos = torch.arange(256 + max(PASS_SIZES)).expand(3, -1).contiguous()
    dec.forward(emb[:256], pos[:, :256], cache)
    out = {}
    for n in PASS_SIZES:
        times = []
        for _ in range(rounds + 1):
            cache.length = 256
            sync(device)
            t = time.perf_counter()
            dec.logits(dec.forward(emb[256:256 + n], pos[:, 256:256 + n], cache))
            sync(device)
            times.append(time.perf_counter() - t)
        out[n] = statistics.median(times[1:]) * 1e3
    return out


def answers(model, prompt: str, specs: dict[str, Speculation | None], rounds: int, **kwargs) -> dict[str, dict]:
    """Each setting's answer, timed in turns; decode tok/s (median), drafts, tokens."""
    runs: dict[str, list] = {k: [] for k in specs}
    for _ in range(rounds):
        for name, spec in specs.items():
            model.speculation = spec
            runs[name].append(model.generate(prompt, cache_prompt=False, **kwargs))
    model.speculation = None
    out = {}
    for name, gens in runs.items():
        g = gens[-1]
        rate = statistics.median(len(x.token_ids) / x.timings["decode_s"] for x in gens)
        out[name] = {"tok_s": round(rate, 2), "tokens": len(g.token_ids), "ids": g.token_ids,
                     "draft_n": int(g.timings.get("draft_n", 0)),
                     "draft_n_accepted": int(g.timings.get("draft_n_accepted", 0))}
    return out


def drafting_costs() -> dict[str, dict[str, float]]:
    """ms of a Drafter's begin and of each draft call, per drafter and prompt length (section 5)."""
    rng = np.random.default_rng(0)
    out = {}
    for kind in SPEC_TYPES[1:]:
        spec = Speculation(n_max=3, types=(kind,))
        for n_prompt in (1000, 8000):
            prompt = rng.integers(100, 50000, n_prompt)
            answer = np.concatenate([prompt[100:300], rng.integers(100, 50000, 100), prompt[500:700]])
            drafter, history = Drafter(), np.zeros(n_prompt + len(answer), np.int64)
            history[:n_prompt] = prompt
            t = time.perf_counter()
            drafter.begin(spec, prompt)
            begin, times = time.perf_counter() - t, []
            for i, token in enumerate(answer):
                t = time.perf_counter()
                drafter.draft(spec, history[:n_prompt + i], int(token), 3, 3)
                times.append(time.perf_counter() - t)
                history[n_prompt + i] = token
            out[f"{kind} {n_prompt}"] = {"begin_ms": begin * 1e3, "median_ms": float(np.median(times)) * 1e3,
                                         "p99_ms": float(np.quantile(times, 0.99)) * 1e3, "max_ms": max(times) * 1e3}
            r = out[f"{kind} {n_prompt}"]
            print(f"  {kind:14s} prompt {n_prompt:5d}: begin {r['begin_ms']:6.2f} ms, a draft call median "
                  f"{r['median_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, most {r['max_ms']:.2f} ms")
    return out


def report(title: str, res: dict[str, dict]) -> None:
    base = res["plain"]
    print(title)
    for name, r in res.items():
        same = "same tokens" if r["ids"] == base["ids"] else "OTHER TOKENS"
        print(f"  {name:22s} {r['tok_s']:8.2f} tok/s  x{r['tok_s'] / base['tok_s']:.2f}  {r['tokens']} tokens, "
              f"drafted {r['draft_n']}, taken {r['draft_n_accepted']}  ({same})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="the GGUF (sections 1-4)")
    ap.add_argument("--tokens", type=int, default=75, help="most answer tokens (the three copies: 75 on Qwen's tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", dest="json_out", help="write the figures here too")
    ap.add_argument("--drafting-only", action="store_true", help="section 5 alone (no model)")
    args = ap.parse_args()
    if args.model is None and not args.drafting_only:
        ap.error("a model GGUF, or --drafting-only")
    print("drafting's own cost, a 500-token answer (no model):")
    drafting = drafting_costs()
    if args.drafting_only:
        return
    model = load(args.model, device=args.device)
    costs = pass_costs(model, args.rounds, args.device)
    print(f"pass over n tokens after 256 ({args.device}, {torch.get_num_threads()} threads): "
          + ", ".join(f"{n}: {ms:.1f} ms (x{ms / costs[1]:.2f})" for n, ms in costs.items()))
    ids = model.tokenizer.encode(SENTENCE, add_special_tokens=False).ids
    copies = parse_gbnf("root ::= (" + " ".join(f"<[{t}]>" for t in ids) + "){3}")
    prompt = "Copy this sentence three times, one a line: " + SENTENCE
    specs = {"plain": None, "ngram-simple max 3": Speculation(n_max=3), "ngram-simple max 7": Speculation(n_max=7),
             "ngram-simple max 16": Speculation(n_max=16),
             "ngram-map-k max 3": Speculation(n_max=3, types=("ngram-map-k",)),
             "ngram-map-k size_m 8": Speculation(n_max=3, types=("ngram-map-k",), map_k=(12, 8, 1)),
             "ngram-map-k4v size_m 8": Speculation(n_max=3, types=("ngram-map-k4v",), map_k4v=(12, 8, 1))}
    repeated = answers(model, prompt, specs, args.rounds, max_new_tokens=args.tokens, format=copies)
    report(f"an answer that repeats a {len(ids)}-token sentence the prompt holds, three times (greedy):", repeated)
    distinct = list(dict.fromkeys(ids))
    p = max(n for n in range(5, len(distinct) + 1) if all(n % d for d in range(2, n)))
    steps = [distinct[(i * step) % p] for step in (1, 2, 3) for i in range(p)]
    shuffled = parse_gbnf("root ::= " + " ".join(f"<[{t}]>" for t in steps))
    free = answers(model, "Say these words.", {"plain": None, "size_n 12, max 3": Speculation(n_max=3),
                                               "size_n 1, max 3": Speculation(1, 48, 3)},
                   args.rounds, max_new_tokens=len(steps), format=shuffled)
    report(f"an answer whose drafts are all refused, {len(steps)} tokens (greedy):", free)
    para = model.tokenizer.encode(PARAGRAPH, add_special_tokens=False).ids
    held = parse_gbnf("root ::= " + " ".join(f"<[{t}]>" for t in para))
    again_specs = {"plain": None, "ngram-simple max 3": Speculation(n_max=3),
                   "ngram-mod max 3": Speculation(n_max=3, types=("ngram-mod",)),
                   "both max 3": Speculation(n_max=3, types=("ngram-simple", "ngram-mod"))}
    model.drafter, model.speculation = Drafter(), again_specs["ngram-mod max 3"]
    model.generate("Write the paragraph about rivers.", cache_prompt=False, max_new_tokens=len(para), format=held)
    again = answers(model, "Write the paragraph about rivers.", again_specs, args.rounds,
                    max_new_tokens=len(para), format=held)
    report(f"a {len(para)}-token answer given before, asked for again (greedy):", again)
    if args.json_out:
        def strip(res: dict[str, dict]) -> dict[str, dict]:
            return {k: {kk: vv for kk, vv in v.items() if kk != "ids"} for k, v in res.items()}

        with open(args.json_out, "w") as f:
            json.dump({"pass_ms": costs, "repeated": strip(repeated), "free": strip(free), "again": strip(again),
                       "drafting": drafting}, f, indent=1)


if __name__ == "__main__":
    main()
