#!/usr/bin/env python3
"""Load qvl-converted GGUFs in llama.cpp (via llama-cpp-python) and compare with llama.cpp's own.

A benchmark-time tool, not a CI step: llama-cpp-python builds llama.cpp from source (~20 min).

For each type, the tiny fixture checkpoint is converted with qvl-convert, loaded by llama.cpp,
and its greedy continuation of a prompt is compared with the one llama.cpp produces from the
fixture's own F16 file (made by llama.cpp's converter). F16 must give identical tokens; the
quantized types print their agreement. Also loads a converted file given with --extra.

    pip install llama-cpp-python==0.3.36
    python scripts/check_llamacpp.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO.parent / "shared" / "fixtures" / "tiny-qwen2.5-vl"
PROMPT = "<|im_start|>user\nTell me a story about a fox.<|im_end|>\n<|im_start|>assistant\n"


def greedy(path: Path, n: int = 24) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=False)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    out = []
    for tok in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def llama_quantize(src: Path, dst: Path, type_name: str) -> None:
    """llama.cpp's own quantizer (llama-quantize) on llama.cpp's own F16 file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[type_name]
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        sys.exit(f"llama_model_quantize failed for {type_name}")


def tensor_differences(ours: Path, theirs: Path) -> list[str]:
    from qvl.runtime.gguf_file import GGUFFile

    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        if set(a.tensors) != set(b.tensors):
            return [f"tensor names differ: {sorted(set(a.tensors) ^ set(b.tensors))}"]
        out = []
        for name, t in a.tensors.items():
            u = b.tensors[name]
            if (t.type, t.ne) != (u.type, u.ne):
                out.append(f"{name}: ours {t.type.name} {list(t.ne)}, llama.cpp {u.type.name} {list(u.ne)}")
            elif a.raw(name).tobytes() != b.raw(name).tobytes():
                out.append(f"{name}: bytes differ ({t.type.name})")
        return out


def compare_checkpoint(checkpoint: Path, llama_f16: Path, types: list[str]) -> None:
    """Our direct conversion vs llama.cpp's converter (f16) and llama-quantize (the rest)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            ours = Path(tmp) / f"ours-{t}.gguf"
            subprocess.run([sys.executable, "-m", "qvl.convert", str(checkpoint), "-o", str(ours), "--type", t,
                            "-q"], check=True, capture_output=True)
            if t == "f16":
                theirs = llama_f16
            else:
                theirs = Path(tmp) / f"llama-{t}.gguf"
                llama_quantize(llama_f16, theirs, t)
            diffs = tensor_differences(ours, theirs)
            results[t] = "identical tensors" if not diffs else diffs[:10]
    print(json.dumps({str(checkpoint): results}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="f16,q8_0,q6_k,q4_k_m,q4_k")
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="other GGUF files to load")
    ap.add_argument("--checkpoint", type=Path, help="also compare on this checkpoint (e.g. 256-wide rows,"
                    " where the K-quants are not fallbacks) ...")
    ap.add_argument("--llama-f16", type=Path, help="... against this F16 GGUF made of it by llama.cpp's "
                    "convert_hf_to_gguf.py (quantized with llama-quantize here)")
    args = ap.parse_args()
    if args.checkpoint and args.llama_f16:
        compare_checkpoint(args.checkpoint, args.llama_f16, args.types.split(","))
    reference = greedy(FIXTURE / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    results = {"reference_f16_llamacpp": reference}
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types.split(","):
            out = Path(tmp) / f"tiny-{t}.gguf"
            subprocess.run([sys.executable, "-m", "qvl.convert", str(FIXTURE / "hf"), "-o", str(out),
                            "--type", t, "-q"], check=True, capture_output=True)
            ids = greedy(out)
            same = sum(a == b for a, b in zip(ids, reference))
            results[t] = {"loaded": True, "tokens_equal_to_reference": f"{same}/{len(reference)}"}
            if t in FTYPES:
                theirs = Path(tmp) / f"llama-quantize-{t}.gguf"
                llama_quantize(FIXTURE / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf", theirs, t)
                diffs = tensor_differences(out, theirs)
                results[t]["tensors_identical_to_llama_quantize"] = not diffs
                if diffs:
                    results[t]["differences"] = diffs[:10]
                requantized = Path(tmp) / f"qvl-quantize-{t}.gguf"  # `qvl quantize` of the same F16 file
                subprocess.run([sys.executable, "-c", "from qvl.runtime.entry import qvl; qvl()", "quantize",
                                str(FIXTURE / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"), t, "-o", str(requantized),
                                "-q"], check=True, capture_output=True)
                diffs = tensor_differences(requantized, theirs)
                results[t]["qvl_quantize_identical_to_llama_quantize"] = not diffs
            if t == "f16" and ids != reference:
                sys.exit(f"F16 conversion differs from llama.cpp's own file: {ids} vs {reference}")
    for path in args.extra:
        results[str(path)] = {"loaded": True, "first_tokens": greedy(path, 8)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
