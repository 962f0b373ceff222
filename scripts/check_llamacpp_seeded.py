"""Sampled answers beside llama.cpp's: the same GGUF, prompt, samplers and seed through libllama
(llama_decode and a llama_sampler_chain ending in llama_sampler_dist(seed), through a few lines of
C compiled here) and through qvl (Model.generate, the prompt as it is, no chat template), and how
many tokens of each answer agree before the first that differs.

    python scripts/check_llamacpp_seeded.py --libllama build/bin/libllama.so [--gguf F] [--seeds 20]

Each line: a sampler setting, how many of the seeds' answers are equal, the tokens equal before
the first difference (of those drawn), and the largest difference of the first step's logits
(qvl's against llama.cpp's, the prompt read by both). Two answers part only where the logits
differ enough to move a draw across a token's boundary: the draws themselves are llama.cpp's
(runtime/llama_random.py). The default GGUF is the tiny fixture's text file (random weights: a
near-uniform distribution, so a hard case: its candidates lie close together).
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import numpy as np
import torch
from build_sampler_vectors import compile_shim  # scripts/: the C shim's build

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"
SHIM = r"""
#include "llama.h"
#include <string.h>
static struct llama_model * M;
static struct llama_context * C;
static const struct llama_vocab * V;
int qvl_open(const char * path, int n_ctx, int f32_cache) {
    llama_backend_init();
    M = llama_model_load_from_file(path, llama_model_default_params());
    if (!M) return -1;
    V = llama_model_get_vocab(M);
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx; cp.n_batch = n_ctx; cp.n_ubatch = n_ctx;
    if (f32_cache) {  /* keys and values kept in float32, as qvl's; flash attention off (it rounds to F16) */
        cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    C = llama_init_from_model(M, cp);
    return C ? llama_vocab_n_tokens(V) : -2;
}
int qvl_tokenize(const char * text, int32_t * out, int max) {
    return llama_tokenize(V, text, strlen(text), out, max, 0, 1);
}
int qvl_generate(const int32_t * prompt, int n_prompt, int n_predict, uint32_t seed, int top_k, float top_p,
                 float min_p, float temp, int32_t * out, float * first_logits) {
    llama_memory_clear(llama_get_memory(C), 1);
    struct llama_sampler * s = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(s, llama_sampler_init_top_k(top_k));
    llama_sampler_chain_add(s, llama_sampler_init_top_p(top_p, 0));
    llama_sampler_chain_add(s, llama_sampler_init_min_p(min_p, 0));
    llama_sampler_chain_add(s, llama_sampler_init_temp_ext(temp, 0.0f, 1.0f));
    llama_sampler_chain_add(s, llama_sampler_init_dist(seed));
    if (llama_decode(C, llama_batch_get_one((int32_t *) prompt, n_prompt))) return -1;
    memcpy(first_logits, llama_get_logits_ith(C, -1), sizeof(float) * llama_vocab_n_tokens(V));
    int n = 0;
    while (n < n_predict) {
        out[n] = llama_sampler_sample(s, C, -1);
        if (llama_vocab_is_eog(V, out[n++])) break;
        if (llama_decode(C, llama_batch_get_one(&out[n - 1], 1))) return -2;
    }
    llama_sampler_free(s);
    return n;
}
"""
# (top_k, top_p, min_p, temperature): llama-server's defaults, looser ones, the whole vocabulary
SETTINGS = {"server defaults": (40, 0.95, 0.05, 0.8), "top-k 5": (5, 1.0, 0.0, 1.0),
            "top-p 0.5": (0, 0.5, 0.0, 1.0), "whole vocabulary": (0, 1.0, 0.0, 1.0)}
PROMPT = "The capital of France is"
SAVED = "top-k 5"  # its candidates lie far apart beside the logits' differences: the answers should all agree


def _shim(lib_path: Path) -> ctypes.CDLL:
    shim = compile_shim(lib_path, SHIM)
    i32p, f32p = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float)
    shim.qvl_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    shim.qvl_tokenize.argtypes = [ctypes.c_char_p, i32p, ctypes.c_int]
    shim.qvl_generate.argtypes = [i32p, ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_int, ctypes.c_float,
                                  ctypes.c_float, ctypes.c_float, i32p, f32p]
    return shim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--libllama", type=Path, required=True, help="libllama.so built from llama.cpp's sources")
    ap.add_argument("--gguf", type=Path, default=FIXTURE, help="a text GGUF both can read")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=24, help="tokens an answer")
    ap.add_argument("--f16-cache", action="store_true",
                    help="llama.cpp's defaults: F16 KV cache, flash attention (else F32 and off, as qvl reckons)")
    ap.add_argument("--save", type=Path, help=f"write llama.cpp's answers of the {SAVED!r} setting (JSON, the "
                    "oracle of tests/runtime/test_seeded_answers.py: run on the fixture converted to F32)")
    args = ap.parse_args()
    from qvl.runtime.loader import load
    from qvl.runtime.sampler_chain import ChainOptions

    shim = _shim(args.libllama)
    n_vocab = shim.qvl_open(str(args.gguf).encode(), 512, int(not args.f16_cache))
    if n_vocab < 0:
        raise SystemExit(f"{args.gguf}: libllama could not load it")
    ids = (ctypes.c_int32 * 256)()
    theirs_prompt = list(ids[:shim.qvl_tokenize(PROMPT.encode(), ids, 256)])
    model = load(args.gguf, device="cpu", dtype=torch.float32)  # float32 throughout, as llama.cpp reckons
    ours_prompt = model.tokenizer.encode(PROMPT).ids
    if ours_prompt != theirs_prompt:
        raise SystemExit(f"the prompt's tokens differ: qvl {ours_prompt}, llama.cpp {theirs_prompt}")
    prompt = (ctypes.c_int32 * len(theirs_prompt))(*theirs_prompt)
    out, first = (ctypes.c_int32 * args.tokens)(), (ctypes.c_float * n_vocab)()
    ours_first = model.prompt_logits(PROMPT, template=False)[-1].float()
    print(f"{args.gguf.name}: prompt {PROMPT!r} ({len(theirs_prompt)} tokens), {args.seeds} seeds, "
          f"{args.tokens} tokens an answer; torch {torch.__version__}")
    saved: dict[str, list[int]] = {}
    for name, (top_k, top_p, min_p, temp) in SETTINGS.items():
        same = agreed = drawn = 0
        for seed in range(args.seeds):
            n = shim.qvl_generate(prompt, len(theirs_prompt), args.tokens, seed, top_k, top_p, min_p, temp, out, first)
            theirs = list(out[:n])
            if name == SAVED:
                saved[str(seed)] = theirs
            gen = model.generate(PROMPT, template=False, max_new_tokens=args.tokens, temperature=temp, top_k=top_k,
                                 top_p=top_p, min_p=min_p, seed=seed,
                                 chain=ChainOptions(("top_k", "top_p", "min_p", "temperature")))
            ours = gen.token_ids
            k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            same += ours == theirs
            agreed += k
            drawn += len(theirs)
        theirs_first = torch.from_numpy(np.ctypeslib.as_array(first).copy())
        diff = float((ours_first - theirs_first).abs().max())
        print(f"{name:18s} ({top_k}, {top_p}, {min_p}, {temp}): {same}/{args.seeds} answers equal, "
              f"{agreed}/{drawn} tokens agree before a difference; first logits within {diff:.2e} "
              f"(their spread: std {float(theirs_first.std()):.3f})")
    if args.save:
        top_k, top_p, min_p, temp = SETTINGS[SAVED]
        args.save.write_text(json.dumps({"gguf": args.gguf.name, "prompt": PROMPT, "prompt_ids": theirs_prompt,
                                         "top_k": top_k, "top_p": top_p, "min_p": min_p, "temperature": temp,
                                         "answers": saved}) + "\n")
        print(f"{args.save}: llama.cpp's {len(saved)} answers of {SAVED!r}")


if __name__ == "__main__":
    main()
