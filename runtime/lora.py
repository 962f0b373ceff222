"""LoRA adapters applied at run time, as llama.cpp's `--lora`: each adapted weight W of the text
model multiplies as `x W^T + s (x A^T) B^T`, W kept as the GGUF stores it (any type, on the CPU
or a GPU), the adapter's A (r, cols) and B (rows, r) beside it.

An adapter is either llama.cpp's adapter GGUF (convert_lora_to_gguf.py's, or `qvl
convert-lora`'s): general.type "adapter", adapter.type "lora", adapter.lora.alpha, and tensors
`<weight>.lora_a` / `<weight>.lora_b`; s = scale * alpha / r as llama.cpp takes it (scale alone
where alpha is 0). Or a PEFT folder, read as `qvl-convert --lora` reads it (convert/lora.py:
peft's factor for each module, its alpha_pattern, rank_pattern and use_rslora included) and
named as the converter names the text model's tensors. The token embeddings and the vision
tower take no run-time adapter (llama.cpp's mmproj takes none either): those adapters are merged
by `qvl-convert --lora` instead, and refused here in one line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize

from .gguf_file import GGUFError, GGUFFile, TensorInfo


LoraSource = tuple[str | Path, float]  # an adapter GGUF or PEFT folder, and the scale of its term


class LoraError(ValueError):
    """An adapter qvl cannot apply to this model; the message names the file and tensor."""


@dataclass(frozen=True)
class LoraFactor:
    """One adapter's term on one weight: `scale * (x @ a.T) @ b.T`."""

    a: torch.Tensor  # (r, cols)
    b: torch.Tensor  # (rows, r)
    scale: float

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraFactor:
        return LoraFactor(self.a.to(device, dtype), self.b.to(device, dtype), self.scale)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (..., rows) float32, a product made for this call (contiguous, not used elsewhere),
        with this term for x (..., cols) added in place: one addmm where the factors are float32."""
        t = x.reshape(-1, self.a.shape[1]).to(self.a.dtype) @ self.a.T
        y = y if y.is_contiguous() else y.contiguous()
        out = y.view(-1, y.shape[-1])
        if self.b.dtype == out.dtype:
            out.addmm_(t, self.b.T, alpha=self.scale)
        else:
            out += self.scale * (t @ self.b.T).float()
        return y


def _float(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    raw = f.raw(info.name)
    return dequantize(np.ascontiguousarray(raw), info.type).reshape(info.shape).astype(np.float32)


def _from_gguf(path: Path, scale: float) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    with GGUFFile(path) as f:
        if f.get("general.type") != "adapter" or f.get("adapter.type") != "lora":
            raise LoraError(f"{path}: not a LoRA adapter GGUF (general.type {f.get('general.type')!r}, "
                            f"adapter.type {f.get('adapter.type')!r})")
        alpha = float(f.get("adapter.lora.alpha", 0.0))
        pairs: dict[str, dict[str, TensorInfo]] = {}
        for name, info in f.tensors.items():
            base, dot, part = name.rpartition(".")
            if not dot or part not in ("lora_a", "lora_b"):
                raise LoraError(f"{path}: tensor '{name}' is not a .lora_a / .lora_b tensor")
            pairs.setdefault(base, {})[part] = info
        out = {}
        for base, ab in pairs.items():
            if set(ab) != {"lora_a", "lora_b"}:
                raise LoraError(f"{path}: '{base}' has only {next(iter(ab))}")
            a, b = _float(f, ab["lora_a"]), _float(f, ab["lora_b"])
            rank = a.shape[0]
            out[base] = (a, b, scale * alpha / rank if alpha else scale)
    return out


def _from_peft(folder: Path, scale: float) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    from ..convert.errors import ConvertError
    from ..convert.layout import text_name
    from ..convert.lora import WEIGHTS, load_adapter

    try:
        adapter, file = load_adapter(folder, scale)
    except ConvertError as e:
        raise LoraError(str(e)) from None
    try:
        embedding = [name for name, pair in adapter.pairs.items() if pair.embedding]
        if embedding:
            raise LoraError(f"{folder / WEIGHTS}: adapts the token embeddings '{embedding[0]}': merge it with "
                            "qvl-convert --lora")
        if adapter.replaced:
            name = next(iter(adapter.replaced))
            raise LoraError(f"{folder / WEIGHTS}: replaces '{name}' whole: merge it with qvl-convert --lora")
        out = {}
        for name, pair in adapter.pairs.items():
            try:
                gguf = text_name(name)
            except ConvertError:
                raise LoraError(f"{folder / WEIGHTS}: adapts '{name}', not a text model matrix: merge it with "
                                "qvl-convert --lora") from None
            out[gguf] = (file.read(pair.a), file.read(pair.b), pair.scale)
    finally:
        file.close()
    return out


def lora_sources(lora: Sequence[str], scaled: Sequence[str]) -> list[LoraSource]:
    """llama.cpp's `--lora A[,B...]` (scale 1) and `--lora-scaled A:SCALE[,B:SCALE...]` values."""
    out: list[LoraSource] = [(item, 1.0) for value in lora for item in value.split(",") if item]
    for value in scaled:
        for item in value.split(","):
            path, colon, scale = item.rpartition(":")
            try:
                out.append((path, float(scale)))
                if not colon or not path or not math.isfinite(out[-1][1]):
                    raise ValueError
            except ValueError:
                raise LoraError(f"--lora-scaled {item!r}: FILE:SCALE, e.g. adapter.gguf:0.5") from None
    return out


def load_loras(adapters: Sequence[LoraSource],
               tensors: dict[str, TensorInfo]) -> dict[str, list[LoraFactor]]:
    """Adapters (a GGUF file or a PEFT folder, and the scale of each) -> their factors by the
    model's tensor name, checked against the model's `tensors` (names and shapes)."""
    out: dict[str, list[LoraFactor]] = {}
    for source, scale in adapters:
        path = Path(source).expanduser()
        if path.is_dir():
            found = _from_peft(path, scale)
        elif path.is_file():
            try:
                found = _from_gguf(path, scale)
            except GGUFError as e:
                raise LoraError(str(e)) from None
        else:
            raise LoraError(f"{path}: no such LoRA adapter (a GGUF file or a PEFT folder)")
        for name, (a, b, s) in found.items():
            if name == "token_embd.weight" or name.startswith(("v.", "mm.")):
                raise LoraError(f"{path}: adapts '{name}': run-time adapters take the text model's matrices; "
                                "merge it with qvl-convert --lora")
            if name not in tensors:
                raise LoraError(f"{path}: adapts '{name}', which the model does not have")
            rows, cols = tensors[name].shape
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != cols or b.shape[0] != rows or a.shape[0] != b.shape[1]:
                raise LoraError(f"{path}: '{name}' is {rows} x {cols}; the adapter's A is {list(a.shape)} and B "
                                f"{list(b.shape)}")
            out.setdefault(name, []).append(LoraFactor(torch.from_numpy(a), torch.from_numpy(b), s))
    return out
