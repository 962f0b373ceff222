"""Build tests/runtime/llamacpp-grammar-draws.npz: the tokens llama.cpp draws while it keeps to a
grammar, the oracle of sampling.sample_allowed (tests/runtime/test_grammar_draws.py).

As llama.cpp's common_sampler_sample does it (grammar_first false): the chain (its samplers and
llama_sampler_dist(seed)) runs over the vocabulary's logits and draws; the grammar sampler
(llama_sampler_init_grammar, over the fixture's vocabulary loaded vocab-only) checks the drawn
token alone; a refused one sends the logits through the grammar first and the chain again, which
draws again. The token is accepted by the grammar and the chain (the penalties' history). Each
step's logits are made of integers alone (`step_logits`: 2^24 levels, no ties, some tokens
raised by 6), so the test rebuilds them bit for bit; the raised tokens are stored.

    python scripts/build_grammar_draws.py --libllama build/bin/libllama.so
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
from pathlib import Path

import numpy as np
from build_sampler_vectors import FIXTURE, TokenData, TokenDataArray, _lib, _sampler, _vocab, token_array

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "runtime" / "llamacpp-grammar-draws.npz"
GRAMMAR = 'root ::= item (", " item)*\nitem ::= "yes" | "no" | [0-9]+\n'
STEPS = 12
# raised tokens: some the grammar allows somewhere, some never
RAISED = ["yes", "no", ",", ", ", " yes", " no", "0", "1", "7", "Yes", "maybe", " the", ".", "\n"]


def step_logits(step: int, n: int, raised: np.ndarray) -> np.ndarray:
    """A step's logits: token i at level (i x 2654435761 + 40503 x step) mod 2^24 of 2^24 in
    [-4, 4) (each level once: no ties), the `raised` tokens 6 higher; float32 exactly."""
    k = (np.arange(n, dtype=np.int64) * 2654435761 + step * 40503) % (1 << 24)
    x = k.astype(np.float32) / np.float32(1 << 21) - np.float32(4)
    x[raised] += np.float32(6)
    return x


def cases() -> list[dict]:
    pen = {"sampler": "penalties", "repeat_last_n": 64, "repeat_penalty": 1.3, "frequency_penalty": 0.0,
           "presence_penalty": 0.0}
    t = {"sampler": "temperature", "temperature": 0.8}
    chains = {"temperature": [t],
              "llama-server": [pen, {"sampler": "top_k", "top_k": 40}, {"sampler": "top_p", "top_p": 0.95},
                               {"sampler": "min_p", "min_p": 0.05}, t],
              "top_k 5": [{"sampler": "top_k", "top_k": 5}, {"sampler": "temperature", "temperature": 1.0}],
              "min_p": [{"sampler": "min_p", "min_p": 0.02}, t]}
    out = [{"chain": name, "steps": steps, "seed": seed} for name, steps in chains.items() for seed in (0, 42)]
    # mirostat 2 in place of the chain and its draw (its target moves at each draw, a refused one too)
    return out + [{"chain": "mirostat 2", "steps": [{"sampler": "temperature", "temperature": 1.0}], "seed": seed,
                   "mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.5} for seed in (0, 42)]


def run(lib: ctypes.CDLL, vocab: int, case: dict, logits: list[np.ndarray], eog: set[int]) -> list[int]:
    """The ids llama.cpp draws over the steps' logits, keeping to GRAMMAR (to an end of turn, if drawn)."""
    chain = [_sampler(lib, step, len(logits[0]), [], case["seed"]) for step in case["steps"]]
    if case.get("mirostat"):
        chain.append(lib.llama_sampler_init_mirostat_v2(case["seed"], case["mirostat_tau"], case["mirostat_eta"]))
    else:
        chain.append(lib.llama_sampler_init_dist(case["seed"]))
    grammar = lib.llama_sampler_init_grammar(vocab, GRAMMAR.encode(), b"root")
    assert grammar, "libllama refused the grammar"
    out = []
    for x in logits:
        arr = token_array(x)
        for s in chain:
            lib.llama_sampler_apply(s, ctypes.byref(arr))
        token = arr.data[arr.selected].id
        one = (TokenData * 1)(TokenData(token, 1.0, 0.0))
        lib.llama_sampler_apply(grammar, ctypes.byref(TokenDataArray(one, 1, -1, False)))
        if one[0].logit == -math.inf:  # refused: the grammar first, then the chain again
            arr = token_array(x)
            for s in (grammar, *chain):
                lib.llama_sampler_apply(s, ctypes.byref(arr))
            token = arr.data[arr.selected].id
        for s in (grammar, *chain):
            lib.llama_sampler_accept(s, token)
        out.append(token)
        if token in eog:
            break
    for s in (grammar, *chain):
        lib.llama_sampler_free(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libllama", required=True, help="libllama.so built from llama.cpp's sources")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    lib = _lib(args.libllama)
    lib.llama_sampler_init_grammar.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.llama_sampler_init_grammar.restype = ctypes.c_void_p
    lib.llama_vocab_is_eog.argtypes, lib.llama_vocab_is_eog.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_bool
    _, vocab, n = _vocab(args.libllama)
    eog = {t for t in range(n) if lib.llama_vocab_is_eog(vocab, t)}
    tok = Tokenizer.from_file(str(FIXTURE / "hf" / "tokenizer.json"))
    pool = np.array([ids[0] for text in RAISED if len(ids := tok.encode(text, add_special_tokens=False).ids) == 1])
    rng = np.random.default_rng(20261207)
    specs, arrays = cases(), {}
    for i, case in enumerate(specs):
        raised = [np.sort(rng.choice(pool, 5, replace=False)) for _ in range(STEPS)]
        drawn = run(lib, vocab, case, [step_logits(j, n, r) for j, r in enumerate(raised)], eog)
        arrays |= {f"{i}.raised": np.stack(raised).astype(np.int32), f"{i}.ids": np.array(drawn, dtype=np.int32)}
        print(case["chain"], case["seed"], drawn)
    np.savez_compressed(args.out, cases=np.array(json.dumps(specs)), grammar=np.array(GRAMMAR), n_vocab=np.array(n),
                        eog=np.array(sorted(eog), dtype=np.int32), **arrays)
    print(f"{args.out}: {len(specs)} runs of up to {STEPS} draws")


if __name__ == "__main__":
    main()
