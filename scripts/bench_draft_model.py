#!/usr/bin/env python3
"""What a draft model (--spec-draft-model, llama.cpp's draft-simple: runtime/draft_model.py) costs
and gains, every figure against plain decoding in the same process:

1. Costs: the target's pass over 1 to 5 tokens after a 256-token prompt and the draft model's
   one-token pass, as multiples of the target's one-token pass (median of --rounds).
2. A model of those costs: a cycle of n guesses costs n draft passes and the target's pass over
   n + 1 tokens; where each guess is taken with probability a, a cycle yields (1 - a^(n+1)) / (1 - a)
   tokens, so the speedup is that over the cycle's cost in one-token passes. The acceptance a is
   not measured: random weights agree with nothing (a trained Qwen2.5-0.5B drafting for a
   Qwen2.5-VL model is what would set it).
3. Answers, timed in turns (greedy, --tokens, held by a grammar to the tokens plain greedy decoding
   gave, asked once untimed: a pass over several tokens rounds bf16 logits otherwise than a pass
   over one, and a random-weight model's top logits tie, so the answers would part): plain; with
   the draft model (its guesses all refused: a cycle's whole cost, no gain); with the target as
   its own draft model (the same weights: its guesses taken, as far as the first pass over several
   tokens rounds alike; the bookkeeping at high acceptance, each guess costing a target pass).

    python scripts/bench_draft_model.py --make /tmp/bd   # a random 3B Q4_K_M and a 0.5B-shaped draft
    python scripts/bench_draft_model.py /tmp/bd/target.gguf /tmp/bd/draft.gguf --tokens 48 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench_speculative import pass_costs
from qvl.runtime.gbnf import parse_gbnf
from make_random_checkpoint import TOKENIZER_SRC, load_model_config
from make_random_gguf import make_random_gguf
from qvl.runtime.draft_model import DraftModel, load_draft
from qvl.runtime.loader import load
from qvl.runtime.speculative import Drafter, Speculation

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SMALL = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "tie_word_embeddings": True}  # Qwen2.5-0.5B's text model
ACCEPTANCE = (0.5, 0.6, 0.7, 0.8, 0.9)


def make(folder: Path, tokenizer: Path) -> None:
    """A random Qwen2.5-VL-3B Q4_K_M and a random draft of Qwen2.5-0.5B's shape (a two-block vision tower)."""
    folder.mkdir(parents=True, exist_ok=True)
    make_random_gguf(load_model_config("qwen2.5-vl-3b"), folder / "target.gguf", force=True, tokenizer=tokenizer)
    small = load_model_config("qwen2.5-vl-3b")
    small.update(SMALL)
    small["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 12, 12]}  # head dim 64
    small["vision_config"].update({"depth": 2, "fullatt_block_indexes": [1], "out_hidden_size": SMALL["hidden_size"]})
    make_random_gguf(small, folder / "draft.gguf", force=True, seed=1, tokenizer=tokenizer)


def predicted(costs: dict[int, float], draft_ms: float, n: int, a: float) -> float:
    """Speedup over plain decoding of n guesses a cycle, each taken with probability a."""
    tokens = (1 - a ** (n + 1)) / (1 - a)
    return tokens / ((n * draft_ms + costs[n + 1]) / costs[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", nargs="?", type=Path)
    ap.add_argument("draft", nargs="?", type=Path)
    ap.add_argument("--make", type=Path, help="write target.gguf and draft.gguf (random weights) into this folder")
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER_SRC, help="--make's tokenizer files")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-max", type=int, default=3, help="guesses a cycle (--spec-draft-n-max)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", dest="json_out", help="write the figures here too")
    args = ap.parse_args()
    if args.make:
        make(args.make, args.tokenizer)
        return
    if args.target is None or args.draft is None:
        ap.error("TARGET and DRAFT GGUFs, or --make FOLDER")
    model = load(args.target, device=args.device)
    small = load_draft(model, args.draft, args.device, False)
    itself = DraftModel(model, True)  # the target's weights, a cache of its own
    costs = pass_costs(model, args.rounds, args.device)
    draft_ms = pass_costs(small.model, args.rounds, args.device)[1]
    print(f"target pass over n tokens after 256 ({args.device}, {torch.get_num_threads()} threads): "
          + ", ".join(f"{n}: {costs[n]:.1f} ms (x{costs[n] / costs[1]:.2f})" for n in range(1, 6)))
    print(f"draft model's one-token pass: {draft_ms:.1f} ms (x{draft_ms / costs[1]:.2f} the target's)")
    table = {n: {a: round(predicted(costs, draft_ms, n, a), 2) for a in ACCEPTANCE} for n in range(1, 5)}
    print(f"predicted speedup by guesses a cycle (rows) and acceptance (columns {', '.join(map(str, ACCEPTANCE))}):")
    for n, row in table.items():
        print(f"  n {n}: " + "  ".join(f"x{v:.2f}" for v in row.values()))
    spec = Speculation(n_max=args.n_max, types=("draft-simple",))
    settings = {"plain": None, "draft model": small, "target as draft": itself}
    greedy = model.generate(PROMPT, cache_prompt=False, max_new_tokens=args.tokens).token_ids
    held = parse_gbnf("root ::= " + " ".join(f"<[{t}]>" for t in greedy))
    runs: dict[str, list] = {k: [] for k in settings}
    for _ in range(args.rounds):
        for name, draft in settings.items():
            model.speculation, model.drafter = (spec if draft else None), Drafter(draft)
            runs[name].append(model.generate(PROMPT, cache_prompt=False, max_new_tokens=len(greedy), format=held))
    out = {}
    print(f"answers of {args.tokens} tokens (greedy, --spec-draft-n-max {args.n_max}), timed in turns:")
    for name, gens in runs.items():
        g = gens[-1]
        rate = statistics.median(len(x.token_ids) / x.timings["decode_s"] for x in gens)
        out[name] = {"tok_s": round(rate, 2), "tokens": len(g.token_ids), "draft_n": int(g.timings.get("draft_n", 0)),
                     "draft_n_accepted": int(g.timings.get("draft_n_accepted", 0)),
                     "same_tokens": g.token_ids == runs["plain"][-1].token_ids}
        r = out[name]
        print(f"  {name:16s} {r['tok_s']:6.2f} tok/s  x{r['tok_s'] / out['plain']['tok_s']:.2f}  drafted "
              f"{r['draft_n']}, taken {r['draft_n_accepted']}  ({'same' if r['same_tokens'] else 'OTHER'} tokens)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"pass_ms": costs, "draft_ms": draft_ms, "predicted": table, "answers": out}, f, indent=1)


if __name__ == "__main__":
    main()
