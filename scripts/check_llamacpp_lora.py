#!/usr/bin/env python3
"""`qvl convert-lora` beside llama.cpp's convert_lora_to_gguf.py on the same PEFT folder.

A check, not a CI step: it runs llama.cpp's converter from a llama.cpp source tree (llama-cpp-
python's sdist carries one: vendor/llama.cpp, with its gguf-py) on ADAPTER, with BASE (the base
checkpoint's folder: only its config.json is read), and qvl convert-lora on the same folder, then
compares the two files' tensors (names, types, shapes, values) and their adapter metadata.

    python scripts/check_llamacpp_lora.py --llama-cpp /path/to/llama.cpp --base ./ckpt ./adapter
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", type=Path, help="a PEFT LoRA folder")
    ap.add_argument("--base", type=Path, required=True, help="the base checkpoint's folder (config.json)")
    ap.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        theirs, ours = Path(d) / "llamacpp.gguf", Path(d) / "qvl.gguf"
        env = {**os.environ, "PYTHONPATH": str(a.llama_cpp / "gguf-py")}
        done = subprocess.run([sys.executable, str(a.llama_cpp / "convert_lora_to_gguf.py"), "--base", str(a.base),
                               "--outfile", str(theirs), str(a.adapter)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"convert_lora_to_gguf.py failed:\n{done.stderr[-2000:]}")
        done = subprocess.run([sys.executable, "-c", "from qvl.runtime.cli import app; app()", "convert-lora",
                               str(a.adapter), "-o", str(ours)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"qvl convert-lora failed: {done.stderr.strip()}")
        files = {"llama.cpp": GGUFReader(theirs), "qvl": GGUFReader(ours)}
        tensors = {k: {t.name: t for t in r.tensors} for k, r in files.items()}
        for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
            values = {k: r.fields[key].contents() if key in r.fields else None for k, r in files.items()}
            print(f"{key:24} {values['llama.cpp']!r:>12} {values['qvl']!r:>12}")
        names = set(tensors["llama.cpp"]) | set(tensors["qvl"])
        apart = [n for n in sorted(names) if n not in tensors["llama.cpp"] or n not in tensors["qvl"]
                 or tensors["llama.cpp"][n].tensor_type != tensors["qvl"][n].tensor_type
                 or tensors["llama.cpp"][n].shape.tolist() != tensors["qvl"][n].shape.tolist()
                 or not np.array_equal(tensors["llama.cpp"][n].data, tensors["qvl"][n].data)]
        print(f"tensors: llama.cpp {len(tensors['llama.cpp'])}, qvl {len(tensors['qvl'])}; "
              f"{len(names) - len(apart)} equal, {len(apart)} apart{': ' + ', '.join(apart[:5]) if apart else ''}")


if __name__ == "__main__":
    main()
