"""Build tests/runtime/llamacpp-spec-sessions.json.gz: the drafts llama.cpp's speculative decoding
makes over whole answers, one after another, the oracle of runtime/speculative.Drafter,
runtime/ngram_mod.py and runtime/ngram_map.py (tests/runtime/test_ngram_mod.py).

A small driver is linked against llama.cpp's own libllama-common (cmake --build build --target
llama-common) and drives its public API as llama-server does: common_speculative_init with the
session's --spec-type and settings, common_speculative_begin with each answer's prompt, then at
each step common_speculative_draft (the history so far, the last sampled token, the room left)
and, after a draft, common_speculative_accept with how many of its tokens the answer took. The
answers are fixed beforehand (a draft is taken as far as it agrees with them), so both sides see
the same steps. Sessions: sentences repeated across an answer and across answers (ngram-mod's table
outlives an answer; ngram-simple sees only the text), small alphabets (drafts refused in streaks:
the table emptied), a prompt of 1.5M tokens (the table over a quarter full: emptied), a chat whose
every prompt holds the last (ngram-map's kept indices stay good) and prompts shorter than the last
history (its keys past the new start dropped); with ngram-simple, ngram-map-k, ngram-map-k4v,
ngram-mod and some together, n-gram sizes 1 to 24, caps 1 to 16, n_min 0 to 48, min_hits 1 to 3.

    python scripts/build_spec_sessions.py --libcommon build/bin/libllama-common.so
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
from build_ngram_drafts import compile_driver  # scripts/: a llama.cpp driver's build

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "runtime" / "llamacpp-spec-sessions.json.gz"
TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod")  # the S line's flags, in this order

DRIVER = r"""
#include "speculative.h"
#include <cstdio>
#include <vector>
// stdin, per session: "S simple map_k map_k4v mod size_n size_m n_match mod_n_max n_min cap k_n k_m k_hits
// k4v_n k4v_m k4v_hits n_requests", then per request
// a prompt ("P len t0 t1 ..." or "G len mul add mod": t_i = (i * mul + add) % mod) and "A len t0 t1 ...".
// stdout: a line "k d0 d1 ..." per draft asked for, and "E" after each session.
static bool read_tokens(llama_tokens & out) {
    char kind; long len;
    if (scanf(" %c %ld", &kind, &len) != 2) return false;
    out.resize(len);
    if (kind == 'G') {
        long long mul, add, mod;
        if (scanf("%lld %lld %lld", &mul, &add, &mod) != 3) return false;
        for (long i = 0; i < len; i++) out[i] = (llama_token) ((i * mul + add) % mod);
        return true;
    }
    for (long i = 0; i < len; i++) if (scanf("%d", &out[i]) != 1) return false;
    return true;
}
int main() {
    int simple, map_k, map_k4v, mod, size_n, size_m, n_match, mod_n_max, n_min, cap, n_req, k[3], k4v[3];
    while (scanf(" S %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d %d", &simple, &map_k, &map_k4v, &mod, &size_n,
                 &size_m, &n_match, &mod_n_max, &n_min, &cap, &k[0], &k[1], &k[2], &k4v[0], &k4v[1], &k4v[2],
                 &n_req) == 17) {
        common_params_speculative params;
        params.types.clear();
        if (simple) params.types.push_back(COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE);
        if (map_k) params.types.push_back(COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K);
        if (map_k4v) params.types.push_back(COMMON_SPECULATIVE_TYPE_NGRAM_MAP_K4V);
        if (mod) params.types.push_back(COMMON_SPECULATIVE_TYPE_NGRAM_MOD);
        params.ngram_map_k.size_n = k[0];
        params.ngram_map_k.size_m = k[1];
        params.ngram_map_k.min_hits = k[2];
        params.ngram_map_k4v.size_n = k4v[0];
        params.ngram_map_k4v.size_m = k4v[1];
        params.ngram_map_k4v.min_hits = k4v[2];
        params.ngram_simple.size_n = size_n;
        params.ngram_simple.size_m = size_m;
        params.ngram_mod.n_match = n_match;
        params.ngram_mod.n_max = mod_n_max;
        params.ngram_mod.n_min = n_min;
        common_speculative * spec = common_speculative_init(params, 1);
        for (int r = 0; r < n_req; r++) {
            llama_tokens prompt, answer, draft;
            if (!read_tokens(prompt) || !read_tokens(answer)) return 1;
            common_speculative_begin(spec, 0, prompt);
            llama_tokens history = prompt;
            size_t pos = 0;  // answer[pos]: the token just sampled
            while (pos + 1 < answer.size()) {
                long room = (long) answer.size() - (long) pos - 2;  // qvl's room: max_new_tokens - i - 2
                long most = room < cap ? room : cap;
                size_t k = 0;
                if (most > 0) {
                    draft.clear();
                    common_speculative_get_draft_params(spec, 0) = {true, (int32_t) most, (llama_pos) history.size(),
                                                                    answer[pos], &history, &draft};
                    common_speculative_draft(spec);
                    printf("%zu", draft.size());
                    for (auto t : draft) printf(" %d", t);
                    printf("\n");
                    while (k < draft.size() && draft[k] == answer[pos + 1 + k]) k++;
                    if (!draft.empty()) common_speculative_accept(spec, 0, (uint16_t) k);
                }
                for (size_t j = 0; j <= k; j++) history.push_back(answer[pos + j]);
                pos += k + 1;
            }
        }
        common_speculative_free(spec);
        printf("E\n");
    }
    return 0;
}
"""


def build_driver(libcommon: Path) -> Path:
    """The driver, compiled against the llama.cpp tree libllama-common was built from."""
    return compile_driver(libcommon, DRIVER, {}, ["llama-common", "llama", "ggml-base"])


def sessions(rng: np.random.Generator) -> list[dict]:
    """Sessions of the kinds the module docstring lists: settings and requests (prompt, answer)."""
    def words(k: int, lo: int = 100, hi: int = 5000) -> list[int]:
        return rng.integers(lo, hi, k).tolist()

    def setting(types: str, n_match: int, cap: int, mod_n_max: int = 64, n_min: int = 48, size_n: int = 12,
                size_m: int = 48, map_k: tuple = (12, 48, 1), map_k4v: tuple = (12, 48, 1)) -> dict:
        return {"types": types.split(","), "size_n": size_n, "size_m": size_m, "n_match": n_match,
                "mod_n_max": mod_n_max, "n_min": n_min, "cap": cap, "map_k": list(map_k), "map_k4v": list(map_k4v)}

    out: list[dict] = []
    settings = [setting("ngram-mod", 24, 3), setting("ngram-mod", 24, 7, n_min=0), setting("ngram-mod", 2, 3),
                setting("ngram-mod", 1, 16, n_min=2), setting("ngram-mod", 3, 5, mod_n_max=2, n_min=0),
                setting("ngram-mod", 4, 1), setting("ngram-mod", 5, 8, mod_n_max=0, n_min=0),
                setting("ngram-simple,ngram-mod", 2, 4, n_min=3, size_n=3, size_m=5),
                setting("ngram-simple,ngram-mod", 24, 7, size_n=12), setting("ngram-simple", 24, 3, size_n=2),
                setting("ngram-map-k", 24, 3, map_k=(2, 4, 1)), setting("ngram-map-k", 24, 7, map_k=(3, 8, 1)),
                setting("ngram-map-k", 24, 16), setting("ngram-map-k", 24, 5, map_k=(1, 3, 1)),
                setting("ngram-map-k4v", 24, 3, map_k4v=(2, 4, 1)), setting("ngram-map-k4v", 24, 7, map_k4v=(3, 5, 2)),
                setting("ngram-map-k4v", 24, 16, map_k4v=(1, 2, 3)), setting("ngram-map-k4v", 24, 4),
                setting("ngram-simple,ngram-map-k", 24, 4, size_n=3, size_m=4, map_k=(2, 6, 1)),
                setting("ngram-map-k,ngram-map-k4v,ngram-mod", 2, 5, n_min=0, map_k=(4, 6, 1), map_k4v=(2, 3, 1))]
    for s in settings:
        sentence, other = words(40), words(33)
        twice = sentence + words(5) + sentence[:30] + other + sentence
        out.append({**s, "requests": [
            {"prompt": words(60) + sentence[:20], "answer": twice},
            {"prompt": words(37), "answer": other + sentence + other[:10] + words(20) + sentence},  # from the table
            {"prompt": sentence + words(8), "answer": words(3) + sentence[:26] + words(4) + sentence},
        ]})
        for alphabet in (2, 3, 5):  # drafts mostly refused: streaks of low acceptance
            out.append({**s, "requests": [{"prompt": words(int(rng.integers(0, 80)), 10, 10 + alphabet),
                                           "answer": words(int(rng.integers(2, 200)), 10, 10 + alphabet)}
                                          for _ in range(3)]})
    for s in settings[-10:]:  # a chat: each prompt holds the last prompt and answer
        history: list[int] = []
        requests = []
        for turn in range(3):
            sentence = words(12)
            history = history + words(int(rng.integers(5, 30))) + sentence
            answer = sentence + words(6) + sentence[:8] + words(int(rng.integers(1, 9)), 10, 14) * 4 + words(3)
            requests.append({"prompt": history, "answer": answer})
            history = history + answer
        out.append({**s, "requests": requests})
    for s in (setting("ngram-mod", 2, 3, n_min=0), setting("ngram-mod", 1, 4, n_min=1)):
        unit = words(30)
        big = {"synthetic": [1_500_000, 2_654_435_761, 12_345, 2_147_483_647]}  # over a quarter of the slots
        out.append({**s, "requests": [{"prompt": big, "answer": unit * 4},
                                      {"prompt": words(9), "answer": unit * 3 + words(7)}]})
    return out


def prompt_line(prompt: list[int] | dict) -> str:
    if isinstance(prompt, dict):
        n, mul, add, mod = prompt["synthetic"]
        return f"G {n} {mul} {add} {mod}\n"
    return f"P {len(prompt)} {' '.join(map(str, prompt))}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libcommon", required=True, help="build/bin/libllama-common.so of a llama.cpp tree")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    drive = build_driver(Path(args.libcommon))
    cases = sessions(np.random.default_rng(11))
    text = ""
    for c in cases:
        text += (f"S {' '.join(str(int(t in c['types'])) for t in TYPES)} {c['size_n']} {c['size_m']} "
                 f"{c['n_match']} {min(c['mod_n_max'], c['cap'])} {c['n_min']} {c['cap']} "
                 f"{' '.join(map(str, c['map_k'] + c['map_k4v']))} {len(c['requests'])}\n")
        for r in c["requests"]:
            text += prompt_line(r["prompt"]) + f"A {len(r['answer'])} {' '.join(map(str, r['answer']))}\n"
    lines = subprocess.run([str(drive)], input=text, capture_output=True, text=True, check=True).stdout.splitlines()
    at = 0
    for c in cases:
        c["drafts"] = []
        while lines[at] != "E":
            c["drafts"].append([int(t) for t in lines[at].split()[1:]])
            at += 1
        at += 1
    assert at == len(lines), (at, len(lines))
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # the same bytes each run
        f.write(json.dumps(cases, separators=(",", ":")).encode())
    drafts = [d for c in cases for d in c["drafts"]]
    print(f"wrote {args.out}: {len(cases)} sessions, {len(drafts)} draft calls, "
          f"{sum(1 for d in drafts if d)} drafts, {sum(len(d) for d in drafts)} draft tokens")


if __name__ == "__main__":
    main()
