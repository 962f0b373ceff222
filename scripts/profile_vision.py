#!/usr/bin/env python3
"""Where the vision tower's time goes, for one image: the parts of its forward pass, and on
CUDA the device time of each torch op and each kernel.

On an H200 the 7B's tower took 0.20-0.27 s for a 2530x1000 image against the 0.15 s target
(docs/benchmarks.md), unprofiled. This encodes a random image of `--size` once to warm up
(Triton compiles), then `--runs` more, timed whole (median), then one more with each part timed
(the device synchronized after each, so that queued work is charged to the part that queued it):

- `attention_window` / `attention_full`: a block's attention half (norm excluded): q/k/v
  projections, rotary, attention over the windows (or the whole image), the out projection;
- `mlp`: a block's MLP half (norm excluded);
- `norm`: the blocks' norms, with the residual adds before them;
- `other`: the rest (patch embedding, rotary tables, window order, merger).

Then (CUDA) one profiled encode: device time per torch op (its kernels' self time) and per
kernel name, largest first, and the GPU memory the tower holds at rest and at its peak (beside
the peak that runtime/placement.py plans for the image: `peak_over_planned`). With
`--stream` the tower's blocks stay in host memory and are copied in a block ahead
(runtime/vision_stream.py): the encode's time then includes what the copies add. One JSON
object on stdout.

    python scripts/profile_vision.py /tmp/q7b-q4_k_m.gguf --device cuda --size 2530x1000 [--stream]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import patched, timed  # noqa: E402  (beside this script)


def op_tables(encode: Callable[[], object], top: int) -> dict[str, list[dict]]:
    """Device time (us) of one `encode` by torch op (self time of the op's kernels) and by
    kernel name, largest first, each led by the total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        encode()
        torch.cuda.synchronize()
    events = prof.key_averages()
    ops = [{"op": e.key[:60], "calls": e.count, "us": round(e.self_device_time_total, 1)}
           for e in events if e.self_device_time_total > 0 and e.device_type.name == "CPU"]
    kernels = [{"kernel": e.key[:80], "calls": e.count, "us": round(e.device_time_total, 1)}
               for e in events if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    tables = {}
    for name, rows, key in (("ops", ops, "op"), ("kernels", kernels, "kernel")):
        rows.sort(key=lambda r: -r["us"])
        total = {key: "(all)", "calls": sum(r["calls"] for r in rows), "us": round(sum(r["us"] for r in rows), 1)}
        tables[name] = [total] + rows[:top]
    return tables


def planned_peak(model_path: str, kernels: bool, patches: int) -> float:
    """The encode's peak placement.py plans for this many patches (bf16 / f16 products)."""
    from qvl.runtime.gguf_file import GGUFFile
    from qvl.runtime.loader import find_mmproj
    from qvl.runtime.placement import PATCH_PIXELS, vision_bytes_per_pixel

    mmproj = find_mmproj(Path(model_path))
    with GGUFFile(mmproj if mmproj is not None else Path(model_path)) as g:  # an Ollama file holds both
        return vision_bytes_per_pixel(g.tensors, kernels, half=True) * patches * PATCH_PIXELS


def profile(model_path: str, device: str, size: tuple[int, int], runs: int = 3, top: int = 15,
            stream: bool = False) -> dict:
    import qvl
    from qvl.runtime.image import preprocess
    from qvl.runtime.model import ALL_LAYERS
    from qvl.runtime.placement import Placement
    from qvl.runtime.vision import VisionTower

    placement = Placement("cuda", ALL_LAYERS, vision_on_accel=True, vision_stream=True) if stream else None
    m = qvl.load(model_path, device=device, placement=placement)
    if m.vision is None:
        raise SystemExit(f"{model_path}: no vision projector beside it")
    tower = m.vision
    cuda = tower.device.type == "cuda"
    cfg = tower.cfg
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pre = preprocess(Image.fromarray(pixels), mean=cfg.image_mean, std=cfg.image_std, patch=cfg.patch_size)
    patches = torch.from_numpy(pre.pixels)

    def encode() -> torch.Tensor:
        out = tower.forward(patches, [pre.grid_thw])
        if cuda:
            torch.cuda.synchronize()
        return out

    at_rest = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    encode()  # compiles
    peak = torch.cuda.max_memory_allocated() - at_rest if cuda else 0
    wall = []
    for _ in range(runs):
        start = time.perf_counter()
        encode()
        wall.append(time.perf_counter() - start)
    parts: dict[str, float] = defaultdict(float)

    def attention_kind(_self, _b, _x, _rot, cu) -> str:
        return "attention_full" if len(cu) - 1 == sum(t for t, _, _ in [pre.grid_thw]) else "attention_window"

    depth = [0]
    patches_ = [(VisionTower, "_attention", timed(parts, attention_kind, VisionTower._attention, cuda, depth)),
                (VisionTower, "_mlp", timed(parts, "mlp", VisionTower._mlp, cuda, depth)),
                (VisionTower, "_norm", timed(parts, "norm", VisionTower._norm, cuda, depth)),
                (VisionTower, "_add_norm", timed(parts, "norm", VisionTower._add_norm, cuda, depth))]
    with patched(patches_):
        start = time.perf_counter()
        encode()
        total = time.perf_counter() - start
    ms = {k: round(1e3 * v, 2) for k, v in sorted(parts.items())}
    ms["other"] = round(1e3 * total - sum(ms.values()), 2)
    report = {"device": str(tower.device), "size": f"{size[0]}x{size[1]}", "grid_thw": list(pre.grid_thw),
              "patches": int(patches.shape[0]), "encode_s_median": round(statistics.median(wall), 4),
              "encode_s_runs": [round(w, 4) for w in wall], "parts_ms": ms, "parts_total_ms": round(1e3 * total, 2),
              "streamed": tower.stream is not None,
              "streamed_host_mib": round(tower.stream.host_bytes / 2**20, 1) if tower.stream is not None else 0}
    if cuda:
        report["model_allocated_gib"] = round(at_rest / 2**30, 3)  # text and vision weights, before the encode
        report["encode_peak_over_rest_gib"] = round(peak / 2**30, 3)
        planned = planned_peak(model_path, tower.kernels, int(patches.shape[0]))
        report["planned_peak_gib"] = round(planned / 2**30, 3)  # what --max-vram and the fit plan for it
        # above 1: the plan lets this image run out of memory (streamed, the blocks' copies add to the
        # peak, which the plan counts with the tower's weights instead)
        report["peak_over_planned"] = round(peak / planned, 3)
    if cuda:
        report.update(op_tables(encode, top))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF with its mmproj beside it")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--size", default="2530x1000", help="image WIDTHxHEIGHT (default 2530x1000)")
    ap.add_argument("--runs", type=int, default=3, help="encodes timed whole (median reported)")
    ap.add_argument("--stream", action="store_true", help="the tower's blocks in host memory (--vision-stream)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    print(json.dumps(profile(args.model, args.device, (w, h), args.runs, stream=args.stream), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
