#!/usr/bin/env python3
"""Where a decode token's time goes: the host's parts against the device's.

On an H200 a random 7B Q4_K_M decoded at 155 tok/s (6.4 ms a token) while the graph's replay
took 4.7 ms (docs/benchmarks.md); this splits the token. A text-only prompt is answered
once to warm up (Triton compiles, the decode step is captured), then `--tokens` more are
generated with each part timed:

- `sample`: picking the token from the logits on the host's side (greedy through DecodeGraph:
  only the prefill's token; the steps choose the rest themselves);
- `text`: the streamed text's piece (runtime/tokenizer.TextStream);
- `embed`: the next token's embedding row, dequantized on the host (not on the DecodeGraph
  path: the step reads it from the token id);
- `step`: the decode step as the caller sees it, host wall time: staging its inputs when it
  must, the step (the captured graph's replay on a GPU, eagerly elsewhere) and, greedy, the
  wait for the chosen token (the next step is queued before it: DecodeGraph.decode_greedy);
  - `stage`: the host's part of staging (the input buffer written and its copy queued);
  - `replay` (CUDA only): the graph's own time between CUDA events around each replay
    (recorded, not waited for: the wait would stop the step queued ahead);
  - `launch` (CUDA only): the host's time in the replay call (cudaGraphLaunch);
- `other`: the rest of the loop (the total minus the parts).

Then one profiled token (torch.profiler), largest first: on CUDA the device time of each
kernel name (`kernels_one_token`), on the CPU the self time of each op (`ops_one_token`). One JSON object on stdout.

    python scripts/profile_decode.py /tmp/q7b-q4_k_m.gguf --device cuda --tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def timed(parts: dict[str, float], name: Callable[..., str] | str, fn: Callable, cuda: bool,
          depth: list[int] | None = None) -> Callable:
    """`fn` that adds its wall seconds to parts[name] (name: or a function of fn's arguments;
    the GPU synchronized after it on CUDA, so that queued work is charged to the part that
    queued it). With `depth` (shared by the parts): a call inside another timed part is not
    counted again."""
    inside = depth if depth is not None else [0]

    def wrapper(*args, **kwargs):
        if depth is not None and inside[0]:
            return fn(*args, **kwargs)
        inside[0] += 1
        start = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
        finally:
            inside[0] -= 1
        parts[name(*args) if callable(name) else name] += time.perf_counter() - start
        return out
    return wrapper


@contextmanager
def patched(patches: list[tuple[object, str, Callable]]) -> Iterator[None]:
    """Each (object, name, fn): fn in place of the attribute inside the block, the attribute as it
    was after (an instance's own attribute removed again, so its class's method shows)."""
    missing = object()
    saved = [(obj, name, obj.__dict__.get(name, missing)) for obj, name, _ in patches]
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        yield
    finally:
        for obj, name, fn in saved:
            if fn is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, fn)


def profile(model_path: str, device: str, tokens: int, prompt: str = "Write a long story about a lighthouse.",
            kernels: int = 15) -> dict:
    import qvl
    import qvl.kernels.q8_activations as q8_activations
    import qvl.runtime.model as model_module
    from qvl.runtime.decode_graph import DecodeGraph
    from qvl.runtime.tokenizer import TextStream

    m = qvl.load(model_path, device=device)
    cuda = m.placement.accel == "cuda"
    # compiles and captures: as many tokens as the timed run, whose cache (and captured step) it
    # then reuses, so that no capture is timed (it was: ~1 ms a token over 64 before)
    warm = m.generate(prompt, max_new_tokens=tokens)
    parts: dict[str, float] = defaultdict(float)
    replay_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    real_replay = torch.cuda.CUDAGraph.replay
    launch_s: list[float] = []

    def replay(graph: torch.cuda.CUDAGraph) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        real_replay(graph)
        launch_s.append(time.perf_counter() - t0)
        end.record()
        replay_events.append((start, end))

    steps = [(DecodeGraph, name, timed(parts, "step", getattr(DecodeGraph, name), False))
             for name in ("step", "decode_greedy")]
    patches = [(model_module, "sample", timed(parts, "sample", model_module.sample, False)),
               (TextStream, "push", timed(parts, "text", TextStream.push, False)),
               # a step embeds its one token; the prompt's embedding (its own part, left out) is not a token's
               (m.decoder, "embed_tokens", timed(parts, lambda ids: "embed" if ids.numel() == 1 else "prompt",
                                                 m.decoder.embed_tokens, cuda)), *steps,
               (DecodeGraph, "stage", timed(parts, "stage", DecodeGraph.stage, False)),
               (model_module.Model, "_decode", timed(parts, "_decode", model_module.Model._decode, cuda))]
    if cuda:
        patches.append((torch.cuda.CUDAGraph, "replay", replay))
    with patched(patches):
        out = m.generate(prompt, max_new_tokens=tokens, cache_prompt=False)
    n = len(out.token_ids)
    decode_s = out.timings["decode_s"]
    per_token = {k: round(1e3 * v / max(n, 1), 3) for k, v in parts.items()
                 if k not in ("_decode", "stage", "prompt")}
    per_token["embed"] = per_token.get("embed", 0.0)
    if "step" not in parts:  # no DecodeGraph (part of the decoder off the accelerator): _decode less its embedding
        per_token["step"] = round(1e3 * parts["_decode"] / max(n, 1) - per_token["embed"], 3)
    per_token["other"] = round(1e3 * decode_s / max(n, 1) - sum(per_token[k] for k in ("sample", "text", "step", "embed")),
                               3)
    if "stage" in parts:
        per_token["stage"] = round(1e3 * parts["stage"] / max(n, 1), 3)
    if replay_events:
        torch.cuda.synchronize()
        replay_ms = [start.elapsed_time(end) for start, end in replay_events]
        per_token["replay"] = round(sum(replay_ms) / len(replay_ms), 3)
        per_token["launch"] = round(1e3 * sum(launch_s) / len(launch_s), 3)
    report = {"device": device, "tokens": n, "decode_tok_s": round(n / decode_s, 2), "ms_per_token": per_token,
              "capture_ms": round(1e3 * warm.timings["capture_s"], 1) if "capture_s" in warm.timings else None,
              "int8_gemv": q8_activations.ENABLED}  # QVL_INT8_GEMV: Q4_K / Q6_K GEMVs on int8 activations
    report["kernels_one_token" if cuda else "ops_one_token"] = kernel_table(m, prompt, kernels, cuda)
    return report


def kernel_table(m, prompt: str, top: int, cuda: bool) -> list[dict]:
    """Device time per kernel name (on the CPU: self time per op) over one generated token after
    the prompt (the prefill is run before the profiler starts: the table is the decode step's)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stream = m.generate(prompt, max_new_tokens=3, stream=True, cache_prompt=False)
    next(stream)  # prefill and the first token: outside the profile
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        next(stream, None)
        if cuda:
            torch.cuda.synchronize()
    for _ in stream:
        pass
    rows = [{"kernel": e.key[:80], "calls": e.count, "us": round(us, 1)} for e in prof.key_averages()
            if (us := e.device_time_total if cuda else e.self_cpu_time_total) > 0]
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    return [{"kernel": "(all)", "calls": sum(r["calls"] for r in rows), "us": round(total, 1)}] + rows[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF (an mmproj beside it is loaded too, not used)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated while timed (default 64)")
    args = ap.parse_args()
    print(json.dumps(profile(args.model, args.device, args.tokens), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
