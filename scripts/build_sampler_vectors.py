"""Build tests/runtime/llamacpp-sampler-vectors.npz: what llama.cpp's own samplers keep of given
logits, the oracle of qvl's sampler chain (runtime/sampler_chain.py) in
tests/runtime/test_sampler_chain.py.

Each case is a chain of llama.cpp samplers (typical, top-n-sigma, XTC at probability 1, dynamic
temperature, top-k, top-p, min-p, temperature, penalties) applied in turn, through ctypes, to a
llama_token_data_array of the case's logits, as llama_sampler_chain applies them; what is left
(ids and logits) is stored with the case's input. min_keep is 0, as llama.cpp's CLI and server
pass it. Left out: typical sampling of logits with -inf among them (llama.cpp's entropy takes
0 x log 0, a NaN, and its order is then undefined; qvl leaves those tokens out of the entropy, as
llama.cpp's dynamic temperature does) and of a near-uniform distribution inside a chain (which
tokens it keeps there is float rounding: scores 3e-6 apart). Needs libllama from llama.cpp's sources (llama-cpp-python's sdist carries them):

    cmake -B build -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF && cmake --build build --target llama
    python scripts/build_sampler_vectors.py --libllama build/bin/libllama.so

DRY (llama_sampler_dry) needs a vocabulary: the tiny fixture's text GGUF is loaded vocab-only by
libllama through a few lines of C compiled here (its model parameters are a struct passed by
value), and DRY's cases are histories of that tokenizer's tokens (repeated phrases, sequence
breakers, breakers split over tokens); what it leaves of zero logits (its penalties) is stored.
Mirostat (versions 1 and 2) runs a sampler over 10 steps of logits: each step's kept tokens and
the token it drew (its own random draw), so that a replay drawing the same tokens checks the
truncation and the target's updates; adaptive-p likewise, each step's transformed probabilities.
Seeded draws: chains of samplers ending in llama_sampler_dist(seed), run DRAWS times over a
case's logits (each drawn token accepted, as llama_sampler_chain accepts it), the drawn ids
stored: qvl's draws (runtime/llama_random.py) must give the same ids with the same seed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "runtime" / "llamacpp-sampler-vectors.npz"


class TokenData(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int32), ("logit", ctypes.c_float), ("p", ctypes.c_float)]


class TokenDataArray(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(TokenData)), ("size", ctypes.c_size_t), ("selected", ctypes.c_int64),
                ("sorted", ctypes.c_bool)]


def token_array(logits: np.ndarray) -> TokenDataArray:
    """A llama_token_data_array of `logits`, ids 0..n-1, unsorted (it keeps its data alive)."""
    n = len(logits)
    data = (TokenData * n)(*[TokenData(i, float(v), 0.0) for i, v in enumerate(logits)])
    return TokenDataArray(data, n, -1, False)


def _lib(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    p = ctypes.c_void_p
    f, i, z, u = ctypes.c_float, ctypes.c_int32, ctypes.c_size_t, ctypes.c_uint32
    for name, args in {"llama_sampler_init_typical": [f, z], "llama_sampler_init_top_n_sigma": [f],
                       "llama_sampler_init_xtc": [f, f, z, u], "llama_sampler_init_temp_ext": [f, f, f],
                       "llama_sampler_init_top_k": [i], "llama_sampler_init_top_p": [f, z],
                       "llama_sampler_init_min_p": [f, z], "llama_sampler_init_temp": [f],
                       "llama_sampler_init_penalties": [i, i, f, f, f], "llama_sampler_init_mirostat": [i, u, f, f, i],
                       "llama_sampler_init_mirostat_v2": [u, f, f], "llama_sampler_init_adaptive_p": [f, f, u],
                       "llama_sampler_init_dist": [u]}.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, p
    lib.llama_sampler_apply.argtypes, lib.llama_sampler_apply.restype = [p, ctypes.POINTER(TokenDataArray)], None
    lib.llama_sampler_accept.argtypes, lib.llama_sampler_accept.restype = [p, i], None
    lib.llama_sampler_free.argtypes, lib.llama_sampler_free.restype = [p], None
    return lib


def _sampler(lib: ctypes.CDLL, step: dict, n_vocab: int, history: list[int], seed: int = 1234) -> int:
    kind = step["sampler"]
    if kind == "typ_p":
        return lib.llama_sampler_init_typical(step["typical_p"], 0)
    if kind == "top_n_sigma":
        return lib.llama_sampler_init_top_n_sigma(step["top_n_sigma"])
    if kind == "xtc":
        return lib.llama_sampler_init_xtc(step["xtc_probability"], step["xtc_threshold"], 0, seed)
    if kind == "temperature":
        return lib.llama_sampler_init_temp_ext(step["temperature"], step.get("dynatemp_range", 0.0),
                                               step.get("dynatemp_exponent", 1.0))
    if kind == "top_k":
        return lib.llama_sampler_init_top_k(step["top_k"])
    if kind == "top_p":
        return lib.llama_sampler_init_top_p(step["top_p"], 0)
    if kind == "min_p":
        return lib.llama_sampler_init_min_p(step["min_p"], 0)
    if kind == "penalties":
        s = lib.llama_sampler_init_penalties(n_vocab, step["repeat_last_n"], step["repeat_penalty"],
                                             step["frequency_penalty"], step["presence_penalty"])
        for token in history:
            lib.llama_sampler_accept(s, token)
        return s
    raise ValueError(kind)


def run_chain(lib: ctypes.CDLL, logits: np.ndarray, steps: list[dict], history: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logits) llama.cpp's samplers leave of `logits`, in its array's order."""
    arr = token_array(logits)
    for step in steps:
        s = _sampler(lib, step, len(logits), history)
        lib.llama_sampler_apply(s, ctypes.byref(arr))
        lib.llama_sampler_free(s)
    left = [arr.data[i] for i in range(arr.size)]
    return (np.array([t.id for t in left], dtype=np.int32), np.array([t.logit for t in left], dtype=np.float32))


SHIM = """
#include "llama.h"
const struct llama_vocab * qvl_load_vocab(const char * path) {
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.vocab_only = 1;
    struct llama_model * m = llama_model_load_from_file(path, mp);
    return m ? llama_model_get_vocab(m) : 0;
}
int32_t qvl_n_tokens(const struct llama_vocab * v) { return llama_vocab_n_tokens(v); }
"""
FIXTURE = REPO.parent / "shared" / "fixtures" / "tiny-qwen2.5-vl"


def compile_shim(lib_path: str | Path, code: str) -> ctypes.CDLL:
    """C `code` calling libllama (llama.h), compiled against the llama.cpp tree `lib_path`
    (build/bin/libllama.so) was built in, and loaded."""
    lib_dir = Path(lib_path).resolve().parent
    source = lib_dir.parents[1]
    work = Path(tempfile.mkdtemp())
    (work / "shim.c").write_text(code)
    subprocess.run(["cc", "-shared", "-fPIC", str(work / "shim.c"), "-o", str(work / "shim.so"),
                    f"-I{source / 'include'}", f"-I{source / 'ggml' / 'include'}", f"-L{lib_dir}", "-lllama",
                    f"-Wl,-rpath,{lib_dir}"], check=True)
    return ctypes.CDLL(str(work / "shim.so"))


def _vocab(lib_path: str) -> tuple[ctypes.CDLL, int, int]:
    """(the shim, a llama_vocab pointer, its token count) of the fixture's text GGUF."""
    shim = compile_shim(lib_path, SHIM)
    shim.qvl_load_vocab.argtypes, shim.qvl_load_vocab.restype = [ctypes.c_char_p], ctypes.c_void_p
    shim.qvl_n_tokens.argtypes, shim.qvl_n_tokens.restype = [ctypes.c_void_p], ctypes.c_int32
    vocab = shim.qvl_load_vocab(str(FIXTURE / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf").encode())
    assert vocab, "the fixture's GGUF did not load"
    return shim, vocab, shim.qvl_n_tokens(vocab)


def dry_cases(tokenizer) -> list[dict]:
    """DRY's cases: histories of the tokenizer's tokens, its options and sequence breakers."""
    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    texts = {
        "phrase": "The cat sat on the mat. " * 4 + "The cat sat on",
        "lines": "Item: apple\nItem: apple\nItem: apple\nItem:",
        "quoted": '"a b c" "a b c" "a b c" "a b',
        "stars": "*bold* word *bold* word *bold* word *bold",
        "user": "User: hi there User: hi there User: hi there User: hi",
        "long": " ".join(["alpha beta gamma delta"] * 30),
        "mixed": "x y z x y z : x y z x y z\n x y z x y",
        "split breaker": "one two three User: one two three User: one two",  # " User" + ":" ends the run
    }
    options = [
        {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64},
        {"dry_multiplier": 1.5, "dry_base": 1.1, "dry_allowed_length": 1, "dry_penalty_last_n": 20},
        {"dry_multiplier": 0.5, "dry_base": 3.0, "dry_allowed_length": 3, "dry_penalty_last_n": 500},
        {"dry_multiplier": 2.0, "dry_base": 1.0, "dry_allowed_length": 0, "dry_penalty_last_n": 64},
    ]
    breaker_sets = [["\n", ":", '"', "*"], ["User:", " there", "\n\n"], ["User:"], []]
    out = []
    for name, text in texts.items():
        for o in options:
            for b in breaker_sets:
                out.append({"dry": {**o, "dry_sequence_breakers": b}, "history": ids(text), "text": name})
    out.append({"dry": {**options[0], "dry_sequence_breakers": ["\n"]}, "history": list(range(50, 70)) * 6,
                "text": "ids"})
    out.append({"dry": {**options[0], "dry_sequence_breakers": ["\n"]}, "history": [5, 6] * 3000,
                "text": "exponent cap"})
    return out


def run_dry(lib: ctypes.CDLL, vocab: int, n_tokens: int, case: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, penalties) llama_sampler_dry takes from zero logits after the case's history."""
    o = case["dry"]
    breakers = [b.encode() for b in o["dry_sequence_breakers"]]
    arr = (ctypes.c_char_p * max(len(breakers), 1))(*breakers)
    s = lib.llama_sampler_init_dry(vocab, o["dry_multiplier"], o["dry_base"], o["dry_allowed_length"],
                                   o["dry_penalty_last_n"], arr, len(breakers))
    for token in case["history"]:
        lib.llama_sampler_accept(s, token)
    cur = token_array(np.zeros(n_tokens, np.float32))
    lib.llama_sampler_apply(s, ctypes.byref(cur))
    lib.llama_sampler_free(s)
    logits = np.ctypeslib.as_array(ctypes.cast(cur.data, ctypes.POINTER(ctypes.c_float)), (n_tokens * 3,))[1::3]
    ids = np.nonzero(logits)[0]
    return ids.astype(np.int32), (-logits[ids]).astype(np.float32)


def mirostat_cases() -> list[dict]:
    """Mirostat's cases: a version, tau and eta, and steps of logits (a generation's tokens)."""
    return [{"mirostat": v, "mirostat_tau": tau, "mirostat_eta": eta, "kind": kind, "n": n, "steps": 10}
            for v in (1, 2) for tau, eta in ((5.0, 0.1), (3.0, 0.3), (8.0, 0.05), (1.0, 0.5))
            for kind, n in (("normal", 400), ("peaked", 200), ("flat", 200))]


def run_mirostat(lib: ctypes.CDLL, case: dict, steps: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
    """Each step's (ids mirostat kept, the id it drew) from one sampler over the steps' logits."""
    if case["mirostat"] == 1:
        s = lib.llama_sampler_init_mirostat(case["n"], 77, case["mirostat_tau"], case["mirostat_eta"], 100)
    else:
        s = lib.llama_sampler_init_mirostat_v2(77, case["mirostat_tau"], case["mirostat_eta"])
    out = []
    for logits in steps:
        arr = token_array(logits)
        lib.llama_sampler_apply(s, ctypes.byref(arr))
        out.append((np.array([arr.data[i].id for i in range(arr.size)], dtype=np.int32), arr.data[arr.selected].id))
    lib.llama_sampler_free(s)
    return out


def adaptive_cases() -> list[dict]:
    """adaptive-p's cases: target and decay, and steps of logits."""
    return [{"adaptive_target": t, "adaptive_decay": d, "kind": kind, "n": n, "steps": 10}
            for t, d in ((0.5, 0.9), (0.1, 0.5), (0.9, 0.99), (0.0, 0.0)) for kind, n in (("normal", 300), ("peaked", 100))]


def run_adaptive(lib: ctypes.CDLL, case: dict, steps: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Each step's (ids, probabilities after the transform, the id drawn), the drawn id accepted
    before the next step, as llama.cpp's chain accepts it."""
    s = lib.llama_sampler_init_adaptive_p(case["adaptive_target"], case["adaptive_decay"], 99)
    out = []
    for logits in steps:
        arr = token_array(logits)
        lib.llama_sampler_apply(s, ctypes.byref(arr))
        left = [arr.data[i] for i in range(arr.size)]
        chosen = arr.data[arr.selected].id
        out.append((np.array([t.id for t in left], dtype=np.int32), np.array([t.p for t in left], dtype=np.float32),
                    chosen))
        lib.llama_sampler_accept(s, chosen)
    lib.llama_sampler_free(s)
    return out


def draw_cases() -> list[dict]:
    """Seeded draws: a chain (llama.cpp's server order and defaults, qvl's order, samplers alone
    that leave the candidates in the vocabulary's order, sort them or put them in typical's
    order, XTC firing half the time), a seed, and logits drawn from DRAWS times."""
    pen = {"sampler": "penalties", "repeat_last_n": 64, "repeat_penalty": 1.3, "frequency_penalty": 0.2,
           "presence_penalty": 0.1}
    t = {"sampler": "temperature", "temperature": 0.8}
    dyn = {"sampler": "temperature", "temperature": 1.0, "dynatemp_range": 0.5, "dynatemp_exponent": 1.0}
    chains = {
        "llama-server": [pen, {"sampler": "top_k", "top_k": 40}, {"sampler": "top_p", "top_p": 0.95},
                         {"sampler": "min_p", "min_p": 0.05}, t],
        "qvl": [pen, t, {"sampler": "top_k", "top_k": 40}, {"sampler": "top_p", "top_p": 0.9},
                {"sampler": "min_p", "min_p": 0.05}],
        "temperature": [{"sampler": "temperature", "temperature": 1.0}],
        "min_p": [{"sampler": "min_p", "min_p": 0.05}, t],
        "lone_min_p": [{"sampler": "min_p", "min_p": 0.3}, t],  # often one candidate: a draw all the same
        "top_p": [{"sampler": "top_p", "top_p": 0.9}, {"sampler": "temperature", "temperature": 1.0}],
        "typ_p": [{"sampler": "typ_p", "typical_p": 0.9}, t],
        "xtc": [{"sampler": "xtc", "xtc_probability": 0.5, "xtc_threshold": 0.05}, t],
        "dynatemp": [dyn],
        "top_n_sigma": [{"sampler": "top_n_sigma", "top_n_sigma": 1.0}, t],
        # sorted by dynamic temperature, then re-sorted by top-k, or kept in the order of the logits
        # before the penalties (llama.cpp's array stays as it was sorted)
        "dynatemp_top_k": [dyn, {"sampler": "top_k", "top_k": 40}],
        "dynatemp_penalties": [dyn, pen, {"sampler": "min_p", "min_p": 0.02}],
        # top-n-sigma left out: its -inf before typical gives llama.cpp a NaN entropy, its order then undefined
        "all": [pen, {"sampler": "top_k", "top_k": 100},
                {"sampler": "typ_p", "typical_p": 0.95}, {"sampler": "top_p", "top_p": 0.95},
                {"sampler": "min_p", "min_p": 0.01},
                {"sampler": "xtc", "xtc_probability": 0.5, "xtc_threshold": 0.1}, t],
    }
    return [{"chain": name, "steps": steps, "seed": seed, "logits": kind, "n": n, "draws": DRAWS}
            for name, steps in chains.items() for seed, (kind, n) in ((0, ("normal", 300)), (299792458, ("two", 300)),
                                                                      (3000000001, ("normal", 2000)))]


DRAWS = 16


def run_draws(lib: ctypes.CDLL, case: dict, logits: np.ndarray) -> list[int]:
    """The ids llama.cpp's chain of the case's samplers and llama_sampler_dist(seed) draws from
    `logits`, DRAWS times, each drawn id accepted (the penalties' history), as llama_sampler_chain
    runs them."""
    chain = [_sampler(lib, step, len(logits), [], case["seed"]) for step in case["steps"]]
    dist = lib.llama_sampler_init_dist(case["seed"])
    out = []
    for _ in range(case["draws"]):
        arr = token_array(logits)
        for s in (*chain, dist):
            lib.llama_sampler_apply(s, ctypes.byref(arr))
        out.append(arr.data[arr.selected].id)
        for s in chain:
            lib.llama_sampler_accept(s, out[-1])
    for s in (*chain, dist):
        lib.llama_sampler_free(s)
    return out


def _logits(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal(n) * 2).astype(np.float32)
    if kind == "peaked":  # one token with most of the mass
        x = rng.standard_normal(n).astype(np.float32)
        x[rng.integers(n)] += 9.0
        return x
    if kind == "two":  # two likely tokens, for XTC's threshold
        x = (rng.standard_normal(n) - 4).astype(np.float32)
        x[rng.choice(n, 2, replace=False)] = [3.0, 2.6]
        return x
    if kind == "flat":  # nearly uniform: high entropy
        return (rng.standard_normal(n) * 0.05).astype(np.float32)
    if kind == "banned":  # some tokens at -inf (a logit bias's ban)
        x = (rng.standard_normal(n) * 2).astype(np.float32)
        x[rng.choice(n, n // 4, replace=False)] = -np.inf
        return x
    raise ValueError(kind)


def cases() -> list[dict]:
    """The cases: each a logits recipe, a history for the penalties, and a chain of steps."""
    out = []
    for kind in ("normal", "peaked", "flat", "banned"):
        for n in (2, 7, 300):
            for p in (0.2, 0.5, 0.9, 0.99) if kind != "banned" else ():  # llama.cpp: 0 * log 0, a NaN entropy
                out.append({"logits": kind, "n": n, "steps": [{"sampler": "typ_p", "typical_p": p}]})
            for s in (0.5, 1.0, 2.5):
                out.append({"logits": kind, "n": n, "steps": [{"sampler": "top_n_sigma", "top_n_sigma": s}]})
            for t, d, e in ((0.8, 0.5, 1.0), (1.0, 1.5, 2.0), (0.3, 0.5, 0.5)):
                out.append({"logits": kind, "n": n, "steps": [{"sampler": "temperature", "temperature": t,
                                                                "dynatemp_range": d, "dynatemp_exponent": e}]})
    for kind in ("two", "peaked", "normal", "flat"):
        for n in (2, 7, 300):
            for thr in (0.05, 0.1, 0.3, 0.5):
                out.append({"logits": kind, "n": n, "steps": [{"sampler": "xtc", "xtc_probability": 1.0,
                                                                "xtc_threshold": thr}]})
    # whole chains: llama.cpp's default order, and others (the history for the penalties)
    pen = {"sampler": "penalties", "repeat_last_n": 64, "repeat_penalty": 1.3, "frequency_penalty": 0.2,
           "presence_penalty": 0.1}
    chains = [
        [pen, {"sampler": "top_n_sigma", "top_n_sigma": 2.0}, {"sampler": "top_k", "top_k": 40},
         {"sampler": "typ_p", "typical_p": 0.95}, {"sampler": "top_p", "top_p": 0.9}, {"sampler": "min_p", "min_p": 0.05},
         {"sampler": "xtc", "xtc_probability": 1.0, "xtc_threshold": 0.1}, {"sampler": "temperature", "temperature": 0.8}],
        [pen, {"sampler": "top_k", "top_k": 40}, {"sampler": "top_p", "top_p": 0.95}, {"sampler": "min_p", "min_p": 0.05},
         {"sampler": "temperature", "temperature": 0.7}],
        [{"sampler": "temperature", "temperature": 0.6}, {"sampler": "top_p", "top_p": 0.9},
         {"sampler": "min_p", "min_p": 0.1}, pen],
        [{"sampler": "typ_p", "typical_p": 0.7}, {"sampler": "temperature", "temperature": 1.3,
                                                  "dynatemp_range": 0.7, "dynatemp_exponent": 1.0},
         {"sampler": "top_k", "top_k": 5}],
        [{"sampler": "min_p", "min_p": 0.02}, {"sampler": "xtc", "xtc_probability": 1.0, "xtc_threshold": 0.02},
         {"sampler": "top_p", "top_p": 0.8}],
    ]
    # not "flat": typical's order of a near-uniform distribution is float rounding (scores 3e-6 apart)
    for kind in ("normal", "peaked", "two"):
        for steps in chains:
            out.append({"logits": kind, "n": 1000, "steps": steps})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libllama", required=True, help="libllama.so built from llama.cpp's sources")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    lib = _lib(args.libllama)
    rng = np.random.default_rng(20261207)
    arrays: dict[str, np.ndarray] = {}
    specs = cases()
    for i, case in enumerate(specs):
        logits = _logits(case["logits"], case["n"], rng)
        history = rng.integers(0, case["n"], 80).tolist()
        ids, left = run_chain(lib, logits, case["steps"], history)
        arrays |= {f"{i}.logits": logits, f"{i}.history": np.array(history, dtype=np.int32), f"{i}.ids": ids,
                   f"{i}.left": left}
    from tokenizers import Tokenizer

    shim, vocab, n_tokens = _vocab(args.libllama)
    lib.llama_sampler_init_dry.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_int32,
                                           ctypes.c_int32, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t]
    lib.llama_sampler_init_dry.restype = ctypes.c_void_p
    dry = dry_cases(Tokenizer.from_file(str(FIXTURE / "hf" / "tokenizer.json")))
    for i, case in enumerate(dry):
        ids, cut = run_dry(lib, vocab, n_tokens, case)
        arrays |= {f"dry{i}.ids": ids, f"dry{i}.cut": cut}
    miro = mirostat_cases()
    for i, case in enumerate(miro):
        steps = [_logits(case["kind"], case["n"], rng) for _ in range(case["steps"])]
        for j, (kept, chosen) in enumerate(run_mirostat(lib, case, steps)):
            arrays |= {f"miro{i}.{j}.logits": steps[j], f"miro{i}.{j}.kept": kept,
                       f"miro{i}.{j}.chosen": np.array(chosen, dtype=np.int32)}
    adaptive = adaptive_cases()
    for i, case in enumerate(adaptive):
        steps = [_logits(case["kind"], case["n"], rng) for _ in range(case["steps"])]
        for j, (ids, probs, chosen) in enumerate(run_adaptive(lib, case, steps)):
            arrays |= {f"adaptive{i}.{j}.logits": steps[j], f"adaptive{i}.{j}.ids": ids,
                       f"adaptive{i}.{j}.probs": probs, f"adaptive{i}.{j}.chosen": np.array(chosen, dtype=np.int32)}
    draws = draw_cases()
    for i, case in enumerate(draws):
        logits = _logits(case["logits"], case["n"], rng)
        arrays |= {f"draw{i}.logits": logits, f"draw{i}.ids": np.array(run_draws(lib, case, logits), dtype=np.int32)}
    np.savez_compressed(args.out, cases=np.array(json.dumps(specs)), dry=np.array(json.dumps(dry)),
                        mirostat=np.array(json.dumps(miro)), adaptive=np.array(json.dumps(adaptive)),
                        draws=np.array(json.dumps(draws)), **arrays)
    print(f"{args.out}: {len(specs)} cases, {len(dry)} DRY cases ({n_tokens} tokens), {len(miro)} mirostat runs, "
          f"{len(adaptive)} adaptive-p runs, {len(draws)} seeded runs of {DRAWS} draws")


if __name__ == "__main__":
    main()
