"""`qvl bench`: llama-bench's table for a model: prompt processing (ppN: a prompt of N tokens
read), text generation (tgN: N tokens decoded, end-of-turn tokens not ending it), both (ppN+tgM:
their tokens over their time together), each at a depth (" @ dD": after D tokens already in the
cache, read once untimed) and, for a model with a vision tower, image encoding (imgWxH: merged
image tokens a second); each the mean and standard deviation over repetitions, after a warm-up
of its own shape (Triton's compiles, the CPU's repacking caches). The prompts are random ordinary token ids.
Reported as llama-bench's markdown table, or its csv / json / jsonl records (`records`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .image import smart_resize
from .model import Model

MERGE = 28  # pixels a side of one merged image token (14-pixel patches, 2x2 merged)


@dataclass(frozen=True)
class Test:
    name: str  # pp512, tg128, pp512+tg128 @ d4096, img1024x1024
    tokens: int
    seconds: list[float] = field(default_factory=list)
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0

    @property
    def rates(self) -> list[float]:
        return [self.tokens / s for s in self.seconds if s > 0]

    def summary(self) -> str:
        if not self.rates:
            return "-"
        mean, sd = _mean_sd(self.rates)
        return f"{mean:.2f} ± {sd:.2f}"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value; both 0 for none), as llama-bench's."""
    if not values:
        return 0.0, 0.0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """llama-bench's: pp512, tg128, pp512+tg128, with " @ d4096" at a depth."""
    name = "+".join(f"{k}{n}" for k, n in (("pp", n_prompt), ("tg", n_gen)) if n)
    return f"{name} @ d{n_depth}" if n_depth else name


def _ids(model: Model, n: int, rng: np.random.Generator) -> list[int]:
    """n random ordinary token ids (no special or added token), as llama-bench's random prompt."""
    return [int(i) for i in rng.integers(0, model.tokenizer.get_vocab_size(with_added_tokens=False), n)]


def measured(model: Model, n_prompt: int, n_gen: int, n_depth: int, reps: int, seed: int) -> Test:
    """One of llama-bench's tests: after a warm-up of its shape, at each repetition n_prompt new
    tokens read and n_gen tokens generated (end-of-turn tokens not ending them), after n_depth
    tokens already in the cache; the seconds are the reading's and the generation's (not the
    depth's)."""
    rng = np.random.default_rng(seed)
    test = Test(test_name(n_prompt, n_gen, n_depth), n_prompt + n_gen, [], n_prompt, n_gen, n_depth)
    ctx = n_depth + n_prompt + max(n_gen, 1) + 1
    depth = _ids(model, n_depth, rng)
    stops, model.stop_ids = model.stop_ids, set()  # as llama-bench: n tokens, whatever they are
    try:
        # llama-bench's warm-up of each test: a prompt of its size read, a token generated, untimed
        model.generate(_ids(model, max(n_prompt, 1), rng), template=False, max_new_tokens=1, ctx_size=ctx,
                       cache_prompt=False)
        if depth:  # the context the test runs at, read once, untimed; each repetition reuses it
            model.generate(depth, template=False, max_new_tokens=0, ctx_size=ctx)
        for _ in range(reps):
            prompt = depth + _ids(model, n_prompt or (0 if depth else 1), rng)
            g = model.generate(prompt, template=False, max_new_tokens=max(n_gen, 1), ctx_size=ctx,
                               cache_prompt=bool(depth))
            seconds = 0.0
            if n_prompt:  # the tokens read, the depth's reused ones not among them
                seconds += g.timings["prefill_s"] * n_prompt / max(g.prompt_tokens - g.reused_tokens, 1)
            if n_gen:
                seconds += g.timings["decode_s"] * n_gen / max(len(g.token_ids), 1)
            test.seconds.append(seconds)
    finally:
        model.stop_ids = stops
    return test


def prompt_processing(model: Model, n: int, reps: int, seed: int) -> Test:
    return measured(model, n, 0, 0, reps, seed)


def text_generation(model: Model, n: int, reps: int) -> Test:
    return measured(model, 0, n, 0, reps, 0)


def image_encoding(model: Model, width: int, height: int, reps: int, seed: int) -> Test:
    h, w = smart_resize(height, width)
    rng = np.random.default_rng(seed)
    test = Test(f"img{width}x{height}", (h // MERGE) * (w // MERGE))
    for _ in range(reps):
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        g = model.generate("Describe it.", images=[picture], max_new_tokens=0, cache_prompt=False)
        test.seconds.append(g.timings["vision_ms"] / 1e3)
    return test


def params_of(model: Model) -> int:
    """The text model's weights (llama-bench's params: the vision tower is in the mmproj file)."""
    return sum(math.prod(t.shape) for t in model.text_file.tensors.values())


def backend(model: Model) -> str:
    if model.placement.accel is None:
        return f"CPU ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else model.placement.accel
    return f"{name}, {'Triton' if model.placement.kernels else 'torch'}"


def table(model_name: str, size: int, model: Model, tests: list[Test]) -> str:
    """llama-bench's markdown table."""
    from .inspect import human_bytes

    rows = [("model", "size", "params", "backend", "test", "t/s")]
    params = params_of(model)
    for t in tests:
        rows.append((model_name, human_bytes(size), f"{params / 1e9:.2f} B", backend(model), t.name, t.summary()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
             for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w if i < 5 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |")
    return "\n".join(lines)


FIELDS = ("model_filename", "model_type", "model_size", "model_n_params", "backends", "n_threads", "n_gpu_layers",
          "n_prompt", "n_gen", "n_depth", "test", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts")


def records(model: Model, name: str, size: int, tests: list[Test], when: str) -> list[dict[str, object]]:
    """Each test as llama-bench's -o json / jsonl / csv record (its field names; `test` is qvl's
    own, for the image tests llama-bench has not; `backends`: qvl's backend line), the samples last."""
    gpu_layers = model.cfg.n_layer - model.decoder.first_on_accel if model.placement.accel is not None else 0
    same = {"model_filename": str(model.text_file.path), "model_type": name, "model_size": size,
            "model_n_params": params_of(model), "backends": backend(model), "n_threads": torch.get_num_threads(),
            "n_gpu_layers": gpu_layers}
    out = []
    for t in tests:
        ns = [round(s * 1e9) for s in t.seconds]
        avg_ns, sd_ns = _mean_sd(ns)
        avg_ts, sd_ts = _mean_sd(t.rates)
        out.append({**same, "n_prompt": t.n_prompt, "n_gen": t.n_gen, "n_depth": t.n_depth, "test": t.name,
                    "test_time": when, "avg_ns": round(avg_ns), "stddev_ns": round(sd_ns), "avg_ts": avg_ts,
                    "stddev_ts": sd_ts, "samples_ns": ns, "samples_ts": t.rates})
    return out


def csv_text(rows: list[dict[str, object]]) -> str:
    """llama-bench's -o csv: a header of the fields, then a row a test (no samples)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    writer.writerows([[r[f] for f in FIELDS] for r in rows])
    return buf.getvalue().rstrip("\n")
