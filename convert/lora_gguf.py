"""`qvl convert-lora`: a PEFT LoRA folder -> llama.cpp's LoRA adapter GGUF, which llama.cpp's
`--lora`, Ollama's ADAPTER and `qvl-run --lora` apply to a base model at run time.

The layout is convert_lora_to_gguf.py's: general.architecture qwen2vl, general.type "adapter",
adapter.type "lora", adapter.lora.alpha (float32), and for each adapted text-model weight its
`<name>.lora_a` (r, in) and `<name>.lora_b` (out, r) (the token embedding's A transposed, as
llama.cpp's embedding lookup reads it). llama.cpp scales a pair by alpha / r with r its own rank
and one alpha for the file: where peft's factor differs (alpha_pattern, use_rslora), B is
multiplied by the ratio, so the file gives peft's deltas exactly. The vision tower's pairs are
left out with a warning (llama.cpp's mmproj takes no adapter; `qvl-convert --lora` merges them),
and whole saved tensors (modules_to_save) are refused, as llama.cpp's converter refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ..runtime.atomic import gguf_written
from .errors import ConvertError
from .layout import text_name
from .lora import WEIGHTS, load_adapter

OUT_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}


@dataclass(frozen=True)
class LoraFile:
    path: Path
    pairs: int  # weights adapted in the file
    left_out: list[str]  # the vision tower's adapted weights, not in the file


def default_lora_out(folder: Path, outtype: str) -> Path:
    return Path.cwd() / f"{folder.expanduser().resolve().name}-{outtype.upper()}-LoRA.gguf"


def _typed(data: np.ndarray, outtype: str) -> tuple[np.ndarray, T]:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if outtype == "f16":
        return data.astype(np.float16), T.F16
    if outtype == "bf16":  # round to nearest even, as gguf-py's bf16
        bits = data.view(np.uint32)
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16), T.BF16
    return data, T.F32


def write_lora_gguf(folder: Path, out: Path, outtype: str = "f32", force: bool = False) -> LoraFile:
    """Write `folder`'s adapter as a GGUF at `out` (whole, or nothing: atomic.gguf_written)."""
    if outtype not in OUT_TYPES:
        raise ConvertError(f"--outtype {outtype!r}: choose one of {', '.join(OUT_TYPES)}")
    folder = folder.expanduser()
    adapter, file = load_adapter(folder, 1.0)
    try:
        if adapter.replaced:
            name = next(iter(adapter.replaced))
            raise ConvertError(f"{folder / WEIGHTS}: saves '{name}' whole (modules_to_save): a LoRA GGUF holds A "
                               "and B pairs only; merge this adapter with qvl-convert --lora")
        tensors: list[tuple[str, np.ndarray]] = []
        left_out = []
        for name, pair in sorted(adapter.pairs.items()):
            if name.startswith("visual."):
                left_out.append(name)
                continue
            gguf_name = text_name(name)
            a, b = file.read(pair.a), file.read(pair.b)
            rank = a.shape[0]
            ratio = pair.scale / (adapter.alpha / rank)  # peft's factor over llama.cpp's alpha / r
            if ratio != 1:
                b = (b * np.float32(ratio)).astype(np.float32)
            tensors += [(gguf_name + ".lora_a", a.T if pair.embedding else a), (gguf_name + ".lora_b", b)]
    finally:
        file.close()
    if not tensors:
        raise ConvertError(f"{folder / WEIGHTS}: adapts no text model weight (llama.cpp's adapters are the text "
                           "model's); merge it with qvl-convert --lora")
    out = out.expanduser()
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent}: output folder does not exist")
    try:
        with gguf_written(out, "qwen2vl") as writer:
            writer.add_type("adapter")
            writer.add_string("adapter.type", "lora")
            writer.add_name(folder.resolve().name)
            writer.add_float32("adapter.lora.alpha", adapter.alpha)
            writer.add_quantization_version(2)
            for name, data in tensors:
                typed, qtype = _typed(data, outtype)
                writer.add_tensor(name, typed, raw_dtype=qtype)
    except OSError as e:
        raise ConvertError(f"writing {out}: {e.strerror or e}") from None
    return LoraFile(out, len(tensors) // 2, left_out)
