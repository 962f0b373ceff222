#!/usr/bin/env python3
"""End-to-end figures: vision encode of a 1008x1008 image, prefill tok/s, decode tok/s, peak
RSS, for qvl and (where llama-cpp-python is installed) llama.cpp on the same GGUF files.

Make the files with scripts/make_random_gguf.py (seconds: the tensor table qvl-convert writes,
random blocks), or the long way with scripts/make_random_checkpoint.py and qvl-convert, e.g.

    python scripts/make_random_gguf.py qwen2.5-vl-3b /tmp/q3b-q4_k_m.gguf --type q4_k_m
    python scripts/bench_run.py /tmp/q3b-q4_k_m.gguf --tokens 16

On a GPU (`--device cuda`, the default where there is one) qvl runs a short warm-up first so
that Triton's compilation is not timed, and reports peak VRAM (torch's peak allocated and
reserved bytes, and the device's used memory after the run, CUDA context included, as
nvidia-smi counts it) and the vision tower's median over five more runs (`vision_s_median`:
one run's wall clock is noisy); `--ctx 4096` adds a run decoding
until the context holds 4096 tokens (peak VRAM with a 4k cache); `--size 2530x1000` for the
issue's wide image; `--gpu-layers N` keeps only the last N decoder layers on the GPU (prompts
through the CPU's layers on the GPU unless `--no-prefill-offload`). Each side runs in its own process so that its peak RSS is its own. Reference (issue 3, this
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
import torch
model_path, image_path, n, device, ctx = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
gpu_layers, offload = int(sys.argv[6]), sys.argv[7] == "1"
def used_gib():  # the whole device as nvidia-smi sees it: CUDA context, allocator pool, any other process
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30
placement = None
if gpu_layers >= 0 and device != "cpu":  # the last gpu_layers decoder layers on the GPU, the rest on the CPU
    from qvl.runtime.placement import Placement
    placement = Placement("cuda", gpu_layers, vision_on_accel=True, prefill_offload=offload)
t0 = time.perf_counter(); m = qvl.load(model_path, device=device, placement=placement); load_s = time.perf_counter() - t0
cuda = m.placement.accel == "cuda"
capture_s = None
if cuda:  # compile the Triton kernels for every shape first: a warm run, then the measured one. As
    # many tokens: the measured run reuses its cache and captured decode step (a capture is once a
    # cache; its time, reported apart, is in the warm run's decode)
    warm = m.generate("Describe this image in detail.", [image_path], max_new_tokens=n)
    capture_s = warm.timings.get("capture_s")
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
# cache_prompt=False: the warm-up's cache would otherwise serve the whole prompt (prompt_cache.py)
out = m.generate("Describe this image in detail.", [image_path], max_new_tokens=n, cache_prompt=False)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t = out.timings
stats = {"device": device, "gpu_layers": gpu_layers if gpu_layers >= 0 else None,
         "prefill_offload": m.decoder.prefill_offload, "load_s": load_s, "vision_s": t.get("vision_ms", 0) / 1e3,
         "prefill_tok_s": out.prompt_tokens / t["prefill_s"],
         "decode_tok_s": len(out.token_ids) / t["decode_s"] if out.token_ids else None,
         "decode_capture_s": capture_s,
         "prompt_tokens": out.prompt_tokens, "peak_rss_gib": rss,
         "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
         "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
         "device_used_gib": used_gib() if cuda else None}
if cuda:  # the vision tower five more times: one run's wall clock gave 0.20 and 0.27 s on an H200
    from qvl.runtime.chat import render
    text = render(m.chat_template, m.messages_for("Describe this image in detail.", 1))
    runs = sorted(m.encode(text, [image_path])[2]["vision_ms"] / 1e3 for _ in range(5))
    stats["vision_s_median"], stats["vision_s_runs"] = runs[2], runs
print(json.dumps(stats))
if cuda and ctx > out.prompt_tokens:  # the same prompt decoded until the context is full: peak VRAM at ctx
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    full = m.generate("Describe this image in detail.", [image_path], max_new_tokens=ctx - out.prompt_tokens,
                      cache_prompt=False)
    print(json.dumps({"device": device, "ctx": ctx, "tokens": len(full.token_ids),
                      "decode_tok_s": len(full.token_ids) / full.timings["decode_s"],
                      "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "device_used_gib": used_gib()}))
"""

LLAMA = """
import ctypes, json, resource, sys, time
import numpy as np
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
from llama_cpp import Llama
model_path, mmproj_path, image_path, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
llm = Llama(model_path=model_path, n_ctx=4096, n_threads=2, n_batch=512, verbose=False)
params = mtmd.mtmd_context_params_default()
params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
mctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), llm.model, params)
bitmap = mtmd.mtmd_helper_bitmap_init_from_file(mctx, image_path.encode(), False)
text = mtmd.mtmd_input_text()
prompt = ("<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"
          + mtmd.mtmd_default_marker().decode() + "Describe this image in detail.<|im_end|>\\n<|im_start|>assistant\\n")
text.text, text.text_len, text.add_special, text.parse_special = prompt.encode(), len(prompt.encode()), False, True
chunks = mtmd.mtmd_input_chunks_init()
assert mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
n_prompt = sum(mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i))
               for i in range(mtmd.mtmd_input_chunks_size(chunks)))
vision, again = 0.0, 0.0  # the first encode (reported, as qvl's is) and a second, warm one
for i in range(mtmd.mtmd_input_chunks_size(chunks)):
    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
    if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
        t0 = time.perf_counter(); assert mtmd.mtmd_encode_chunk(mctx, chunk) == 0; vision += time.perf_counter() - t0
        t0 = time.perf_counter(); assert mtmd.mtmd_encode_chunk(mctx, chunk) == 0; again += time.perf_counter() - t0
n_past = llama_cpp.llama_pos(0)
t0 = time.perf_counter()  # the helper encodes the image once more, warm: the warm encode's time is subtracted
assert mtmd.mtmd_helper_eval_chunks(mctx, llm.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
prefill = time.perf_counter() - t0 - again
logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
tok = int(np.argmax(logits))
llm.n_tokens = n_past.value
t1 = time.perf_counter()
for _ in range(n):  # greedy, one token per eval: the same work as qvl's decode loop
    llm.eval([tok])
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # not eval_logits: it lists every row, seconds a call
decode = time.perf_counter() - t1
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"vision_s": vision, "prefill_tok_s": n_prompt / prefill, "decode_tok_s": n / decode,
                  "prompt_tokens": n_prompt, "peak_rss_gib": rss}))
"""


def _run_qvl(argv: list[str], tmp: Path) -> list[dict]:
    """qvl's measurements, each also echoed to stderr as it comes: a run stopped by a time
    limit (the GPU sessions' `timeout`) still leaves the figures it had."""
    with open(tmp / "qvl.err", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", QVL, *argv], stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                print(f"qvl: {line.strip()}", file=sys.stderr, flush=True)
                lines.append(json.loads(line))
        if proc.wait():
            err.seek(0)
            sys.exit(err.read()[-2000:])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--size", default="1008", help="test image: N (N x N pixels) or WxH, e.g. 2530x1000")
    ap.add_argument("--ctx", type=int, default=0, help="on a GPU, decode the same prompt on until this many "
                    "tokens too and report peak VRAM there (the issue's 4096)")
    ap.add_argument("--gpu-layers", type=int, default=-1, help="on a GPU, only the last N decoder layers there "
                    "(the rest on the CPU; default: all)")
    ap.add_argument("--no-prefill-offload", action="store_true", help="with --gpu-layers, prompts through the CPU's "
                    "layers on the CPU (default: each copied to the GPU for the prompt)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="qvl's device (llama.cpp runs only with --device cpu: the installed build is CPU-only)")
    args = ap.parse_args()
    width, _, height = args.size.partition("x")
    size = (int(height or width), int(width))  # (rows, columns)
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "bench.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(image)
        lines = _run_qvl([str(args.model), str(image), str(args.tokens), args.device, str(args.ctx),
                          str(args.gpu_layers), "0" if args.no_prefill_offload else "1"], Path(tmp))
        result = {"image": f"{size[1]}x{size[0]}", "qvl": lines[0]}
        if len(lines) > 1:
            result["qvl_to_ctx"] = lines[1]
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            result["llama.cpp"] = "llama-cpp-python not installed"
        if result["qvl"]["device"] != "cpu":
            result["llama.cpp"] = "not run: compare on the CPU (--device cpu)"
        elif "llama.cpp" not in result:
            from qvl.runtime.loader import find_mmproj

            ll = subprocess.run([sys.executable, "-c", LLAMA, str(args.model), str(find_mmproj(args.model)),
                                 str(image), str(args.tokens)],
                                capture_output=True, text=True)
            result["llama.cpp"] = json.loads(ll.stdout.splitlines()[-1]) if ll.returncode == 0 else ll.stderr[-500:]
        ours, theirs = result["qvl"], result["llama.cpp"]
        if isinstance(theirs, dict):
            result["ratios_qvl_over_llama_cpp"] = {
                k: round(ours[k] / theirs[k], 3) for k in ("vision_s", "prefill_tok_s", "decode_tok_s", "peak_rss_gib")
                if ours.get(k) and theirs.get(k)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
