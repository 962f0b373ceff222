#!/usr/bin/env python3
"""Where a prompt's time goes: the parts of a prefill, and on CUDA each kernel's device time.

On an H200 a random 7B Q4_K_M read a 1396-token prompt at 3336 tok/s (docs/benchmarks.md),
~47 TFLOP/s, while its largest GEMM alone ran at 235; unprofiled. This reads a text prompt of
about `--tokens` tokens once to warm up (Triton compiles), then `--runs` more, timed whole
(median), then once more with each part timed (the device synchronized after each, so that
queued work is charged to the part that queued it):

- `embed`: the prompt's embedding rows, dequantized on the host;
- `attention`: rotary, the KV cache's write and the causal attention, every layer;
- `projections`: the rest of the layers: norms, q/k/v, o, gate/up, SwiGLU, down;
- `offload_copy`: with layers on the CPU (`--gpu-layers`), their copies to the GPU
  (runtime/decoder.prefill_offload; none with --no-prefill-offload). Each is made on a worker
  thread while the layer before runs (runtime/copy_ahead.py): timed on the host there, and not
  taken from `other`, as it overlaps the layers (`copy_ahead` true in the report); with
  QVL_COPY_IN_TURN=1, made in turn and timed as the other parts;
- `logits`: the last token's output layer;
- `other`: the rest of the call (the chat template and tokenizer, the cache, positions).

With QVL_DEQUANT_GEMM=1 the GEMMs decode slabs of weight rows and multiply them with cuBLAS
(kernels/dequant.py); `dequant_gemm` and `mm_out_dtype_float32` in the report say so.

Then (CUDA) one profiled prefill: device time per torch op and per kernel name, largest first
(host-to-device copies appear as Memcpy rows), and the device's total against the wall time.
One JSON object on stdout.

    python scripts/profile_prefill.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 1396 [--gpu-layers 14]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import patched, timed  # noqa: E402  (beside this script)
from profile_vision import op_tables  # noqa: E402


def prompt_of(tokenizer, tokens: int) -> str:
    """Plain text of about `tokens` tokens (the chat template adds its own few)."""
    words = "the keeper climbed the tower at dusk and lit the lamp for the ships".split()
    text = ""
    i = 0
    while len(tokenizer.encode(text)) < tokens - 16:
        text += words[i % len(words)] + " "
        i += 1
    return text


def profile(model_path: str, device: str, tokens: int, runs: int = 3, top: int = 15,
            gpu_layers: int | None = None, offload: bool = True) -> dict:
    import qvl
    from qvl.kernels import dequant
    from qvl.runtime import copy_ahead
    from qvl.runtime.decoder import Decoder
    from qvl.runtime.model import ALL_LAYERS
    from qvl.runtime.placement import Placement

    placement = None
    if gpu_layers is not None or not offload:
        placement = Placement("cuda", ALL_LAYERS if gpu_layers is None else gpu_layers, vision_on_accel=True,
                              prefill_offload=offload)
    m = qvl.load(model_path, device=device, placement=placement)
    cuda = m.placement.accel == "cuda"
    prompt = prompt_of(m.tokenizer, tokens)

    def prefill():
        out = m.generate(prompt, max_new_tokens=0, cache_prompt=False)
        if cuda:
            torch.cuda.synchronize()
        return out

    first = prefill()  # compiles
    wall = [prefill().timings["prefill_s"] for _ in range(runs)]
    parts: dict[str, float] = defaultdict(float)
    patches = [(m.decoder, "embed_tokens", timed(parts, "embed", m.decoder.embed_tokens, cuda)),
               (Decoder, "_attend", timed(parts, "attention", Decoder._attend, cuda)),
               (Decoder, "layer_forward", timed(parts, "layers", Decoder.layer_forward, cuda)),
               (Decoder, "_layer", timed(parts, "offload_copy", Decoder._layer, cuda and not copy_ahead.AHEAD)),
               (Decoder, "logits", timed(parts, "logits", Decoder.logits, cuda))]
    with patched(patches):
        start = time.perf_counter()
        prefill()
        total = time.perf_counter() - start
    ms = {k: round(1e3 * v, 2) for k, v in sorted(parts.items())}
    ms["projections"] = round(ms.pop("layers", 0.0) - ms.get("attention", 0.0), 2)  # attention runs inside
    overlapped = ms.get("offload_copy", 0.0) if copy_ahead.AHEAD else 0.0
    ms["other"] = round(1e3 * total - sum(ms.values()) + overlapped, 2)
    n = first.prompt_tokens
    median = statistics.median(wall)
    report = {"device": device, "prompt_tokens": n, "gpu_layers": min(m.placement.gpu_layers, m.cfg.n_layer + 1),
              "n_layer": m.cfg.n_layer, "prefill_offload": m.decoder.prefill_offload, "copy_ahead": copy_ahead.AHEAD,
              "prefill_s_median": round(median, 4), "prefill_s_runs": [round(w, 4) for w in wall],
              "prefill_tok_s": round(n / median, 1), "parts_ms": ms, "parts_total_ms": round(1e3 * total, 2),
              # QVL_DEQUANT_GEMM=1: GEMMs through dequantized slabs and cuBLAS (float32 out where torch.mm took it)
              "dequant_gemm": dequant.ON_TENSOR_CORES, "mm_out_dtype_float32": dequant._out_dtype_works}
    if cuda:
        tables = op_tables(prefill, top)
        report.update(tables)
        report["device_ms"] = round(tables["kernels"][0]["us"] / 1e3, 2)  # the kernels' total, against the wall
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF (an mmproj beside it is loaded too, not used)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--tokens", type=int, default=1396, help="prompt tokens, about (default 1396: a 1024x1024 "
                    "image's prompt)")
    ap.add_argument("--runs", type=int, default=3, help="timed prefills (default 3)")
    ap.add_argument("--gpu-layers", type=int, default=None, help="decoder layers on the GPU (default: all)")
    ap.add_argument("--no-prefill-offload", action="store_true", help="the CPU's layers read the prompt there")
    args = ap.parse_args()
    print(json.dumps(profile(args.model, args.device, args.tokens, args.runs, gpu_layers=args.gpu_layers,
                             offload=not args.no_prefill_offload), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
