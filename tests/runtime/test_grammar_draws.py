"""Draws that keep to a grammar are llama.cpp's (sampling.sample_allowed against
llamacpp-grammar-draws.npz, scripts/build_grammar_draws.py): libllama's chain and grammar sampler,
over the fixture's vocabulary, drew these tokens with these seeds, a refused draw followed by the
grammar and the chain again, as common_sampler_sample does; qvl, with the same GBNF read by
gbnf.py and the same seeds, draws the same tokens, to the end of turn where one was drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qvl.runtime.gbnf import parse_gbnf
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.json_format import JsonConstraint, token_table
from qvl.runtime.sampler_chain import ChainOptions
from qvl.runtime.sampling import SamplingParams, sample_allowed
from qvl.runtime.tokenizer import tokenizer_from_gguf

VECTORS = np.load(Path(__file__).with_name("llamacpp-grammar-draws.npz"))
CASES = json.loads(str(VECTORS["cases"]))
N_VOCAB = int(VECTORS["n_vocab"])


def step_logits(step: int, raised: np.ndarray) -> torch.Tensor:
    """build_grammar_draws.step_logits: 2^24 levels in [-4, 4), one a token, the raised 6 higher."""
    k = (np.arange(N_VOCAB, dtype=np.int64) * 2654435761 + step * 40503) % (1 << 24)
    x = k.astype(np.float32) / np.float32(1 << 21) - np.float32(4)
    x[raised] += np.float32(6)
    return torch.from_numpy(x)


@pytest.fixture(scope="module")
def table(fixtures_dir):
    tok = tokenizer_from_gguf(GGUFFile(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"))
    return token_table(tok, N_VOCAB)


def _params(case: dict) -> SamplingParams:
    values: dict = {"temperature": 1.0, "seed": case["seed"]}
    for step in case["steps"]:
        values |= {k: v for k, v in step.items() if k != "sampler"}
    mirostat = {k: case[k] for k in ("mirostat", "mirostat_tau", "mirostat_eta") if k in case}
    return SamplingParams(**values, chain=ChainOptions(tuple(s["sampler"] for s in case["steps"]), **mirostat))


@pytest.mark.parametrize("i", range(len(CASES)), ids=lambda i: "{chain}-{seed}".format(**CASES[i]))
def test_draws_keeping_to_a_grammar_are_llama_cpps(table, i):
    case, want = CASES[i], VECTORS[f"{i}.ids"].tolist()
    form = JsonConstraint(table, set(VECTORS["eog"].tolist()), parse_gbnf(str(VECTORS["grammar"])))
    p, gen, got = _params(case), torch.Generator().manual_seed(case["seed"]), []
    for j, raised in enumerate(VECTORS[f"{i}.raised"][:len(want)]):
        got.append(sample_allowed(step_logits(j, raised), got, p, gen, form))
        if got[-1] in form.stop_ids:
            break
        form.accept(got[-1])
    assert got == want


def test_the_runs_refuse_draws_and_end_some_answers():
    """Not trivial: the runs draw 60 tokens or more, ten distinct or more, and some end with an end
    of turn (a grammar's end, as llama.cpp allows it)."""
    eog = set(VECTORS["eog"].tolist())
    runs = [VECTORS[f"{i}.ids"].tolist() for i in range(len(CASES))]
    assert sum(r[-1] in eog for r in runs) >= 2 and sum(len(r) for r in runs) >= 60
    assert len({t for r in runs for t in r}) >= 10
