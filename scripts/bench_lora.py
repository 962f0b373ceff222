#!/usr/bin/env python3
"""What a run-time LoRA adapter costs a decode token: MODEL with and without a random adapter of
rank R on every text matrix (q, k, v, o, gate, up, down), in one process, greedy decode timed in
turns (A, B, A, B, ...) so that a noisy machine's drift hits both; the median of each, and the
ratio. Also the adapter's terms alone: their time a token over the model's matrices (x of one
token), float32 and bf16 factors.

    python scripts/bench_lora.py model-q4_k_m.gguf --rank 16 --tokens 32 --rounds 3 [--cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter

from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.loader import load
from qvl.runtime.lora import LoraFactor

MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_adapter(model: Path, out: Path, rank: int) -> list[tuple[int, int]]:
    """A random LoRA adapter GGUF (alpha 2 rank) for the model's text matrices; their shapes."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(out, "qwen2vl")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 2.0 * rank)
    shapes = []
    with GGUFFile(model) as g:
        for name, info in g.tensors.items():
            if name.startswith("blk.") and name.split(".")[2] in MATRICES and name.endswith(".weight"):
                rows, cols = info.shape
                shapes.append((rows, cols))
                writer.add_tensor(name + ".lora_a", (rng.standard_normal((rank, cols)) * 0.01).astype(np.float32))
                writer.add_tensor(name + ".lora_b", (rng.standard_normal((rows, rank)) * 0.01).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return shapes


def terms_ms(shapes: list[tuple[int, int]], rank: int, dtype: torch.dtype, device: str) -> float:
    """The adapter's terms for one token over all the matrices: ms, best of 3."""
    gen = torch.Generator().manual_seed(0)
    factors = [LoraFactor(torch.randn(rank, c, generator=gen).to(device, dtype),
                          torch.randn(o, rank, generator=gen).to(device, dtype), 2.0) for o, c in shapes]
    xs = {c: torch.randn(1, c, device=device) for _, c in shapes}
    best = float("inf")
    for _ in range(3):
        ys = [torch.zeros(1, o, device=device) for o, _ in shapes]
        t = time.perf_counter()
        for f, y, (_, c) in zip(factors, ys, shapes):
            f.add_to(y, xs[c])
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu", action="store_true")
    a = ap.parse_args()
    device = "cpu" if a.cpu or not torch.cuda.is_available() else "cuda"
    with tempfile.TemporaryDirectory() as d:
        adapter = Path(d) / "adapter.gguf"
        shapes = write_adapter(a.model, adapter, a.rank)
        models = {"plain": load(a.model, device=device), f"rank {a.rank}": load(a.model, device=device,
                                                                                lora=[(adapter, 1.0)])}
        rates: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(a.rounds):
            for label, m in models.items():
                out = m.generate("Write a long story about a cat.", max_new_tokens=a.tokens, cache_prompt=False,
                                 logit_bias={t: float("-inf") for t in m.stop_ids})  # all the tokens asked for
                rates[label].append((len(out.token_ids) - 1) / out.timings["decode_s"])
    plain, adapted = (statistics.median(v) for v in rates.values())
    for label, v in rates.items():
        print(f"{label:>10}: decode {statistics.median(v):.2f} tok/s (runs: {', '.join(f'{x:.2f}' for x in v)})")
    print(f"ratio: {adapted / plain:.3f} ({len(shapes)} adapted matrices, {device})")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"the terms alone, {dtype}: {terms_ms(shapes, a.rank, dtype, device):.1f} ms a token")


if __name__ == "__main__":
    main()
