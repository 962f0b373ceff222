#!/usr/bin/env python3
"""`qvl perplexity` beside llama.cpp's llama-perplexity on the same GGUF files and text.

A check, not a CI step: it needs llama.cpp's llama-perplexity binary (built from the llama.cpp
sources in llama-cpp-python's sdist: cmake -B build && cmake --build build --target llama-perplexity).

For each model: both tools' PPL of the text (same chunks), and the ratio. Then, with the first
model as the base, the KL divergence of every other model measured four ways: each tool reading
the file of the base's log-probabilities that it wrote itself, and each reading the other's (the
files are the same format: `--kl-divergence-base FILE`). The files' tokens are compared too (the
two tokenizers on the same text). With --lora ADAPTER.gguf each model's PPL is measured again
with the adapter applied at run time by both tools (llama-perplexity's --lora, qvl's --lora).

    python scripts/check_llamacpp_perplexity.py --llama-perplexity BIN --text wiki.txt -c 128 --chunks 4 \\
        base-f16.gguf model-q8_0.gguf model-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from qvl.runtime.logits_file import read


def llama(binary: str, model: Path, args: list[str], threads: int) -> str:
    cmd = [binary, "-m", str(model), "-ngl", "0", "-t", str(threads), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llama-perplexity failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def llama_figure(out: str, pattern: str) -> float:
    found = re.findall(pattern, out)
    if not found:
        sys.exit(f"llama-perplexity printed no {pattern!r}:\n{out[-2000:]}")
    return float(found[-1])


def qvl(model: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-c", "from qvl.runtime.cli import app; app()", "perplexity", str(model), "--cpu",
           "--json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"qvl perplexity failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="GGUF text models; the first is the base")
    ap.add_argument("--llama-perplexity", required=True, help="llama.cpp's llama-perplexity binary")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("-c", "--ctx-size", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", type=Path, help="a LoRA adapter GGUF: each model's PPL again with it")
    a = ap.parse_args()
    common = ["-c", str(a.ctx_size), "--chunks", str(a.chunks)]
    lc_common = [*common, "-b", str(a.ctx_size), "-ub", str(a.ctx_size)]
    print(f"text {a.text}, {a.chunks} chunks of {a.ctx_size} tokens")
    print(f"{'model':40} {'PPL llama.cpp':>14} {'PPL qvl':>12} {'qvl/llama.cpp':>14}")
    for m in a.models:
        for adapter in [[], ["--lora", str(a.lora)]] if a.lora else [[]]:
            lc = llama_figure(llama(a.llama_perplexity, m, ["-f", str(a.text), *lc_common, *adapter], a.threads),
                              r"Final estimate: PPL = ([0-9.]+)")
            ours = qvl(m, ["-f", str(a.text), *common, *adapter])["ppl"]
            label = m.name + (f" + {a.lora.name}" if adapter else "")
            print(f"{label:40} {lc:14.4f} {ours:12.4f} {ours / lc:14.6f}")
    if len(a.models) < 2:
        return
    with tempfile.TemporaryDirectory() as d:
        files = {"llama.cpp": Path(d) / "llamacpp.kld", "qvl": Path(d) / "qvl.kld"}
        llama(a.llama_perplexity, a.models[0], ["-f", str(a.text), *lc_common, "--kl-divergence-base",
                                                str(files["llama.cpp"])], a.threads)
        qvl(a.models[0], ["-f", str(a.text), *common, "--kl-divergence-base", str(files["qvl"])])
        lc_file, q_file = read(files["llama.cpp"]), read(files["qvl"])
        same = sum(x == y for x, y in zip(lc_file.tokens, q_file.tokens))
        print(f"\nbase {a.models[0].name}: the two files' tokens agree at {same} of {len(q_file.tokens)}")
        print(f"{'model':40} {'base file by':>13} {'KLD llama.cpp':>14} {'KLD qvl':>12} {'same top qvl':>13}")
        for m in a.models[1:]:
            for maker, path in files.items():
                lc = llama_figure(llama(a.llama_perplexity, m, ["--kl-divergence-base", str(path), "--kl-divergence",
                                                                "-b", str(a.ctx_size), "-ub", str(a.ctx_size),
                                                                "-c", str(a.ctx_size)], a.threads),
                                  r"Mean\s+KLD:\s+(-?[0-9.]+)")
                ours = qvl(m, ["--kl-divergence-base", str(path), "--kl-divergence"])
                print(f"{m.name:40} {maker:>13} {lc:14.6f} {ours['kld']:12.6f} {100 * ours['same_top']:12.2f}%")


if __name__ == "__main__":
    main()
