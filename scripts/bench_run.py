#!/usr/bin/env python3
"""End-to-end CPU figures: vision encode of a 1008x1008 image, prefill tok/s, decode tok/s, peak
RSS, for qvl and (where llama-cpp-python is installed) llama.cpp on the same GGUF files.

Make the files with scripts/make_random_checkpoint.py and qvl-convert --type q4_k_m, e.g.

    python scripts/make_random_checkpoint.py qwen2.5-vl-3b /tmp/q3b
    qvl-convert /tmp/q3b --type q4_k_m -o /tmp/q3b-q4_k_m.gguf
    python scripts/bench_run.py /tmp/q3b-q4_k_m.gguf --tokens 16

Each side runs in its own process so that its peak RSS is its own. Reference (issue 3, this
machine, 2 threads): llama.cpp decodes 8.6 tok/s, prefills 17.4 tok/s, encodes the image in 78 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

QVL = """
import json, resource, sys, time
import numpy as np
from PIL import Image
import qvl
model_path, image_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter(); m = qvl.load(model_path); load_s = time.perf_counter() - t0
out = m.generate("Describe this image in detail.", [image_path], max_new_tokens=n)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t = out.timings
print(json.dumps({"load_s": load_s, "vision_s": t.get("vision_ms", 0) / 1e3,
                  "prefill_tok_s": out.prompt_tokens / t["prefill_s"],
                  "decode_tok_s": len(out.token_ids) / t["decode_s"] if out.token_ids else None,
                  "prompt_tokens": out.prompt_tokens, "peak_rss_gib": rss}))
"""

LLAMA = """
import json, resource, sys, time
import numpy as np
from llama_cpp import Llama
model_path, n = sys.argv[1], int(sys.argv[2])
llm = Llama(model_path=model_path, n_ctx=2048, n_threads=2, verbose=False, logits_all=False)
prompt = llm.tokenize(("<|im_start|>user\\n" + "word " * 256 + "<|im_end|>\\n<|im_start|>assistant\\n").encode(),
                      add_bos=False, special=True)
t0 = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t0
t1 = time.perf_counter()
for _ in range(n):  # greedy, one token per eval: the same work as qvl's decode loop
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # not eval_logits: it lists every row, seconds a call
    llm.eval([tok])
decode = time.perf_counter() - t1
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"prefill_tok_s": len(prompt) / prefill, "decode_tok_s": n / decode, "peak_rss_gib": rss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--size", type=int, default=1008, help="square test image side in pixels")
    args = ap.parse_args()
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "bench.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(image)
        qvl = subprocess.run([sys.executable, "-c", QVL, str(args.model), str(image), str(args.tokens)],
                             capture_output=True, text=True)
        if qvl.returncode:
            sys.exit(qvl.stderr[-2000:])
        result = {"qvl": json.loads(qvl.stdout.splitlines()[-1])}
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            result["llama.cpp"] = "llama-cpp-python not installed"
        else:
            ll = subprocess.run([sys.executable, "-c", LLAMA, str(args.model), str(args.tokens)],
                                capture_output=True, text=True)
            result["llama.cpp"] = json.loads(ll.stdout.splitlines()[-1]) if ll.returncode == 0 else ll.stderr[-500:]
        ours, theirs = result["qvl"], result["llama.cpp"]
        if isinstance(theirs, dict):
            result["ratios_qvl_over_llama_cpp"] = {
                k: round(ours[k] / theirs[k], 3) for k in ("prefill_tok_s", "decode_tok_s") if ours.get(k) and theirs.get(k)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
