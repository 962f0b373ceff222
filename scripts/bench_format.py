"""What `format` ("json" or a schema) adds to a token's choice, against the free choice measured in
the same run.

Formats: "json", a JSON schema, llama.cpp's json.gbnf read by gbnf.py (the same documents as
"json", through the general grammar engine), and a typed schema (a date, bounded numbers, a
pattern, a uuid: grammars embedded from GBNF). Two cases: (1) a model that keeps to the format: logits that favour the next token of a JSON
document (the allowed token is the likeliest: one check a token); (2) the tiny random model of
the fixtures, whose likeliest tokens are rarely allowed (the worst case: many checks and masks
over the 152k vocabulary). Prints milliseconds a token and the difference.

    python scripts/bench_format.py [--tokens 64]   (the fixtures from ../shared, or QVL_SHARED)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from qvl.runtime.gbnf import JSON_GBNF, parse_gbnf
from qvl.runtime.json_format import JsonConstraint, format_grammar, token_table
from qvl.runtime.loader import load
from qvl.runtime.sampling import SamplingParams, sample, sample_allowed

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QVL_SHARED", REPO.parent / "shared"))
FIXTURE = SHARED / "fixtures/tiny-qwen2.5-vl/llamacpp/tiny-qwen2.5-vl-f16.gguf"
SCHEMA = {"type": "object", "properties": {
    "shop": {"type": "string"}, "date": {"type": "string", "maxLength": 10},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "price": {"type": "number"}}, "required": ["name", "price"]}},
    "total": {"type": "number"}}, "required": ["shop", "date", "items", "total"]}
DOC = {"shop": "Bäckerei Müller", "date": "2026-12-06", "items": [
    {"name": "Brötchen", "price": 0.45}, {"name": "Kaffee, groß", "price": 3.2}, {"name": "Laugenbrezel", "price": 1.1}],
    "total": 4.75}
# the same receipt with typed fields (a pydantic model's schema): a date, bounded numbers, a pattern, a uuid
TYPED = {"type": "object", "properties": {
    "shop": {"type": "string"}, "date": {"type": "string", "format": "date"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "price": {"type": "number", "minimum": 0, "maximum": 1000}},
        "required": ["name", "price"]}},
    "total": {"type": "number", "exclusiveMinimum": 0}, "till": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
    "id": {"type": "string", "format": "uuid"}}, "required": ["shop", "date", "items", "total", "till", "id"]}
TYPED_DOC = {**DOC, "till": "KA-042", "id": "123e4567-e89b-12d3-a456-426614174000"}


def following(model, fmt, params: SamplingParams, doc: dict = DOC) -> tuple[float, float]:
    """ms a token, (free, with the format), over the tokens of `doc` written as json.dumps does."""
    table = token_table(model.tokenizer, model.cfg.n_vocab)
    ids = model.tokenizer.encode(json.dumps(doc, ensure_ascii=False)).ids
    n = model.cfg.n_vocab
    rows = []
    for t in ids:
        logits = torch.randn(n)
        logits[t] = 30.0
        rows.append(logits)
    out = []
    for constrained in (False, True):
        form = JsonConstraint(table, model.stop_ids, format_grammar(fmt))
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for logits, want in zip(rows, ids):
            tok = sample_allowed(logits, [], params, gen, form) if constrained else sample(logits, [], params, gen)
            assert tok == want, (tok, want)
            if constrained:
                form.accept(tok)
        out.append((time.perf_counter() - t0) / len(ids) * 1e3)
    return out[0], out[1]


def random_model(model, fmt, kwargs: dict, tokens: int) -> tuple[float, float, int]:
    """ms a token, free and with the format, and the tokens the formatted answer had (it may end early)."""
    out = []
    for f in (None, fmt):
        g = model.generate("Read the receipt.", max_new_tokens=tokens, format=f, cache_prompt=False, **kwargs)
        out.append((g.timings["decode_s"] / max(len(g.token_ids), 1) * 1e3, len(g.token_ids)))
    return out[0][0], out[1][0], out[1][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--grammar-file", nargs="*", default=[], help="GBNF files (llama.cpp's grammars/*.gbnf) to "
                    "time on the random tiny model too, drawn at temperature 0.8")
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = load(FIXTURE, device="cpu")
    model.generate("warm up", max_new_tokens=2, format="json")  # the token table, once
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms a token (free -> with the format)")
    for name, fmt, doc in (("json", "json", DOC), ("schema", SCHEMA, DOC), ("gbnf", parse_gbnf(JSON_GBNF), DOC),
                           ("typed", TYPED, TYPED_DOC)):
        for label, params in (("greedy", SamplingParams()), ("temperature 0.8", SamplingParams(temperature=0.8))):
            free, constrained = following(model, fmt, params, doc)
            print(f"  {name:7s} following model, {label:16s} {free:7.2f} -> {constrained:7.2f}  (+{constrained - free:.2f})")
        for label, kwargs in (("greedy", {}), ("temperature 0.8", {"temperature": 0.8, "seed": 1})):
            free, constrained, n = random_model(model, fmt, kwargs, args.tokens)
            print(f"  {name:7s} random tiny model, {label:15s} {free:7.2f} -> {constrained:7.2f}  "
                  f"(+{constrained - free:.2f}; {n} tokens)")
    for path in args.grammar_file:
        grammar = parse_gbnf(Path(path).read_text())
        free, constrained, n = random_model(model, grammar, {"temperature": 0.8, "seed": 1}, args.tokens)
        print(f"  {Path(path).name:16s} random tiny model, temperature 0.8 {free:7.2f} -> {constrained:7.2f}  "
              f"(+{constrained - free:.2f}; {n} tokens)")


if __name__ == "__main__":
    main()
