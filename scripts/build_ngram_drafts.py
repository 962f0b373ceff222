"""Build tests/runtime/llamacpp-ngram-drafts.npz: the drafts llama.cpp's ngram-simple speculative
decoding makes of token histories, the oracle of runtime/speculative.ngram_simple_draft
(tests/runtime/test_speculative.py).

llama.cpp's own common_ngram_simple_draft (common/ngram-map.cpp of the tree libggml-base.so was
built in) is compiled with a small driver (its debug log left out) and given histories: random
ones over alphabets of 1 to 6 tokens (many matches, some too short to draft), periodic ones
(periods 1 to 60: a draft only where the period exceeds size_n), a sentence repeated with a
token changed, and histories too short to search; each with size_n in 1, 2, 3, 4, 12 and size_m in
1, 2, 5, 48, and a sampled token that continues the history's pattern or not.

    python scripts/build_ngram_drafts.py --libggml build/bin/libggml-base.so
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "runtime" / "llamacpp-ngram-drafts.npz"
SIZES = [(1, 1), (1, 5), (2, 2), (2, 48), (3, 5), (4, 2), (12, 48), (12, 5), (3, 48)]

LOG_STUB = """#pragma once
#define LOG_DBG(...) do {} while (0)
#define LOG_INF(...) do {} while (0)
#define LOG_WRN(...) do {} while (0)
#define LOG_ERR(...) do {} while (0)
#define LOG(...) do {} while (0)
"""

DRIVER = r"""
#include "ngram-map.h"
#include <cstdio>
// stdin: cases "size_n size_m sampled len t0 t1 ..."; stdout: a line "k d0 d1 ..." each
int main() {
    int n, m, sampled, len;
    while (scanf("%d %d %d %d", &n, &m, &sampled, &len) == 4) {
        llama_tokens hist(len);
        for (int i = 0; i < len; i++) {
            if (scanf("%d", &hist[i]) != 1) return 1;
        }
        common_ngram_simple_config cfg{(uint16_t) n, (uint16_t) m};
        llama_tokens d = common_ngram_simple_draft(cfg, hist, sampled);
        printf("%zu", d.size());
        for (auto t : d) printf(" %d", t);
        printf("\n");
    }
    return 0;
}
"""


def compile_driver(lib: Path, driver: str, files: dict[str, str], libs: list[str]) -> Path:
    """`driver` and `files` (name -> text: more sources, and headers found before the tree's) compiled
    in a new folder against the llama.cpp tree whose build/bin holds `lib`, linked to `libs` there."""
    lib_dir = lib.resolve().parent
    source = lib_dir.parents[1]
    work = Path(tempfile.mkdtemp())
    for name, text in {"drive.cpp": driver, **files}.items():
        (work / name).write_text(text)
    sources = [str(work / name) for name in ("drive.cpp", *files) if name.endswith(".cpp")]
    subprocess.run(["c++", "-O1", "-std=c++17", f"-I{work}", f"-I{source / 'common'}", f"-I{source / 'include'}",
                    f"-I{source / 'ggml' / 'include'}", *sources, "-o", str(work / "drive"), f"-L{lib_dir}",
                    *(f"-l{name}" for name in libs), f"-Wl,-rpath,{lib_dir}"], check=True)
    return work / "drive"


def build_driver(libggml: Path) -> Path:
    """llama.cpp's ngram-map.cpp and the driver, compiled (the tree is libggml's build's; the log
    stub is found before common/log.h: the file's own folder comes first)."""
    source = libggml.resolve().parents[2]
    return compile_driver(libggml, DRIVER, {"ngram-map.cpp": (source / "common" / "ngram-map.cpp").read_text(),
                                            "log.h": LOG_STUB}, ["ggml-base"])


def histories(rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """(history, sampled) pairs of the kinds the module docstring lists."""
    out: list[tuple[np.ndarray, int]] = []
    for alphabet in (1, 2, 3, 6):
        for _ in range(6):
            h = rng.integers(0, alphabet, int(rng.integers(0, 120))) + 10
            out.append((h, int(rng.integers(0, alphabet)) + 10))
    for period in (1, 2, 3, 5, 12, 13, 14, 20, 49, 60):
        unit = rng.integers(100, 5000, period)
        reps = int(np.ceil(150 / period)) + 1
        h = np.tile(unit, reps)[:int(rng.integers(period * 2, period * reps))]
        nxt = int(unit[len(h) % period])
        out += [(h, nxt), (h, nxt + 1)]  # continuing the pattern, and leaving it
    sentence = rng.integers(100, 5000, 30)
    changed = sentence.copy()
    changed[17] += 1
    h = np.concatenate([sentence, rng.integers(100, 5000, 9), changed, sentence[:14]])
    out += [(h, int(sentence[14])), (h, int(changed[14]))]
    out += [(np.arange(k, dtype=np.int64) + 7, 9) for k in (0, 1, 5, 13, 14, 15, 62, 63)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libggml", required=True, help="build/bin/libggml-base.so of a llama.cpp tree")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    drive = build_driver(Path(args.libggml))
    cases = [(n, m, h, s) for h, s in histories(np.random.default_rng(7)) for n, m in SIZES]
    text = "".join(f"{n} {m} {s} {len(h)} {' '.join(map(str, h.tolist()))}\n" for n, m, h, s in cases)
    lines = subprocess.run([str(drive)], input=text, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(cases), (len(lines), len(cases))
    drafts = [[int(t) for t in line.split()[1:]] for line in lines]
    hist_at = np.cumsum([0] + [len(h) for _, _, h, _ in cases])
    draft_at = np.cumsum([0] + [len(d) for d in drafts])
    np.savez_compressed(
        args.out, sizes=np.array([[n, m] for n, m, _, _ in cases], np.int32),
        sampled=np.array([s for _, _, _, s in cases], np.int64),
        histories=np.concatenate([h for _, _, h, _ in cases]).astype(np.int64), history_at=hist_at,
        drafts=np.array([t for d in drafts for t in d], np.int64), draft_at=draft_at)
    print(f"wrote {args.out}: {len(cases)} cases, {sum(1 for d in drafts if d)} with a draft, "
          f"{draft_at[-1]} draft tokens")


if __name__ == "__main__":
    main()
