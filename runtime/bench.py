"""`qvl bench`: llama-bench's table for a model: prompt processing (ppN: a prompt of N tokens
read), text generation (tgN: N tokens decoded, end-of-turn tokens not ending it) and, for a
model with a vision tower, image encoding (imgWxH: merged image tokens a second); each the mean
and standard deviation over repetitions, after one warm-up (Triton's compiles, the CPU's
repacking caches)."""

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
    name: str  # pp512, tg128, img1024x1024
    tokens: int
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [self.tokens / s for s in self.seconds if s > 0]

    def summary(self) -> str:
        rates = self.rates
        if not rates:
            return "-"
        sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
        return f"{statistics.mean(rates):.2f} ± {sd:.2f}"


def _prompt(model: Model, n: int, rng: np.random.Generator) -> str:
    """Text of about n tokens: random ordinary tokens (as llama-bench's random prompt), decoded."""
    special = set(model.tokenizer.get_added_tokens_decoder())
    ids = [int(i) for i in rng.integers(0, model.tokenizer.get_vocab_size(with_added_tokens=False), 4 * n + 16)
           if int(i) not in special]
    text = model.tokenizer.decode(ids[:n])
    # decoding and encoding again may merge or split: trim to n tokens of the re-encoded text
    again = model.tokenizer.encode(text, add_special_tokens=False).ids
    return model.tokenizer.decode(again[:n])


def prompt_processing(model: Model, n: int, reps: int, seed: int) -> Test:
    rng = np.random.default_rng(seed)
    test = Test(f"pp{n}", n)
    for _ in range(reps):
        g = model.generate(_prompt(model, n, rng), template=False, max_new_tokens=1, cache_prompt=False)
        test.seconds.append(g.timings["prefill_s"] * n / max(g.prompt_tokens, 1))
    return test


def text_generation(model: Model, n: int, reps: int) -> Test:
    test = Test(f"tg{n}", n)
    stops, model.stop_ids = model.stop_ids, set()  # as llama-bench: n tokens, whatever they are
    try:
        for _ in range(reps):
            g = model.generate("Once upon a time", template=False, max_new_tokens=n, cache_prompt=False)
            test.seconds.append(g.timings["decode_s"] * n / max(len(g.token_ids), 1))
    finally:
        model.stop_ids = stops
    return test


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
