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

An adapter's scale can change while the model is loaded (qvl serve's POST /lora-adapters and a
request's `lora`, as llama.cpp's server): every factor reads its adapter's `AdapterScale`, on
the CPU as a number (a term at scale 0 is skipped), on a GPU through its A, kept there
multiplied by the scale and written again in place when it changes (a captured CUDA graph reads
the new values; no extra launch a product).
"""

from __future__ import annotations

import hashlib
import math
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.quants import dequantize

from .gguf_file import GGUFError, GGUFFile, TensorInfo


LoraSource = tuple[str | Path, float]  # an adapter GGUF or PEFT folder, and the scale of its term


class LoraError(ValueError):
    """An adapter qvl cannot apply to this model; the message names the file and tensor."""


class AdapterScale:
    """One adapter's scale at run time, shared by its factors. On the accelerator's side each
    factor's A is kept multiplied by it (`scaled`), so a product there costs no more than at a
    fixed scale; `set` writes those copies again in place (from the host's A), where a captured
    CUDA graph reads them at its next replay."""

    def __init__(self, value: float):
        self.value = float(value)
        self._scaled: list[tuple[torch.Tensor, weakref.ref]] = []  # (A on the host, its scaled copy)

    def scaled(self, a: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`a` (on the host) on `device` in `dtype`, times the scale: a copy `set` rewrites."""
        out = a.to(device, dtype) * self.value
        self._scaled = [(h, r) for h, r in self._scaled if r() is not None]  # layer copies that are gone
        self._scaled.append((a, weakref.ref(out)))
        return out

    def set(self, value: float) -> None:
        self.value = float(value)
        for a, ref in self._scaled:
            out = ref()
            if out is not None:
                out.copy_(a.to(out.device, out.dtype) * self.value)


@dataclass(frozen=True)
class LoraFactor:
    """One adapter's term on one weight: `gain * knob.value * (x @ a.T) @ b.T`; `gain` is the
    adapter's own factor for it (alpha / r, peft's patterns), `knob` the adapter's scale. On the
    accelerator's side (`to`), `a` is the knob's scaled copy and the term `gain * (x @ a.T) @ b.T`."""

    a: torch.Tensor  # (r, cols)
    b: torch.Tensor  # (rows, r)
    gain: float
    knob: AdapterScale = field(default_factory=lambda: AdapterScale(1.0))
    on_device: bool = False  # moved with its matrix to the accelerator's side: `a` carries the scale

    @property
    def scale(self) -> float:
        return self.gain * self.knob.value

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraFactor:
        if self.on_device:
            raise ValueError("LoraFactor.to: already moved (its A carries the scale); move the host's factor")
        return LoraFactor(self.knob.scaled(self.a, device, dtype), self.b.to(device, dtype), self.gain, self.knob,
                          True)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y (..., rows) float32, a product made for this call (contiguous, not used elsewhere),
        with this term for x (..., cols) added in place: one addmm where the factors are float32.
        On the CPU a term at scale 0 adds nothing."""
        if not self.on_device and self.scale == 0:
            return y
        alpha = self.gain if self.on_device else self.scale
        t = x.reshape(-1, self.a.shape[1]).to(self.a.dtype) @ self.a.T
        y = y if y.is_contiguous() else y.contiguous()
        out = y.view(-1, y.shape[-1])
        if self.b.dtype == out.dtype:
            out.addmm_(t, self.b.T, alpha=alpha)
        else:
            out += alpha * (t @ self.b.T).float()
        return y


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter, as qvl serve's GET /lora-adapters lists it."""

    path: str
    scale: AdapterScale
    task_name: str = ""  # adapter.lora.task_name / prompt_prefix of an adapter GGUF, else empty
    prompt_prefix: str = ""


@dataclass(frozen=True)
class Adapters:
    """A model's run-time adapters, in the order given, and their factors by tensor name."""

    adapters: tuple[Adapter, ...] = ()
    factors: dict[str, list[LoraFactor]] = field(default_factory=dict)

    def scales(self) -> list[float]:
        return [a.scale.value for a in self.adapters]

    def set_scales(self, scales: Sequence[float]) -> None:
        for adapter, value in zip(self.adapters, scales, strict=True):
            if adapter.scale.value != value:
                adapter.scale.set(value)

    def asked(self, entries: Any, where: str = "lora") -> list[float]:
        """llama.cpp server's [{"id": 0, "scale": 0.5}, ...]: those adapters' scales, 0 for each it
        leaves out (its construct_lora_list); an id the model has no adapter for is refused."""
        if not isinstance(entries, list):
            raise LoraError(f'{where}: a list of {{"id": N, "scale": S}} objects')
        scales = [0.0] * len(self.adapters)
        for i, entry in enumerate(entries):
            got = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(got, int) or isinstance(got, bool) or not 0 <= got < len(scales):
                have = f"ids 0 to {len(scales) - 1}" if scales else "none"
                raise LoraError(f"{where}[{i}]: an object with an adapter's id (the model's adapters: {have}; "
                                "GET /lora-adapters lists them)")
            value = entry.get("scale", 0.0)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise LoraError(f"{where}[{i}].scale: a number")
            scales[got] = float(value)
        return scales

    @property
    def salt(self) -> int:
        """0 where no adapter adds a term, else a number from the adapters' paths and scales: a
        prompt's cache identities carry it (prompt_cache.py), so that keys and values computed
        under other adapters or scales are not reused."""
        on = [(a.path, a.scale.value) for a in self.adapters if a.scale.value != 0]
        if not on:
            return 0
        digest = hashlib.blake2b(digest_size=8)
        for path, value in on:
            digest.update(path.encode() + b"\0" + struct.pack("<d", value))
        return 1 + int.from_bytes(digest.digest(), "little") % ((1 << 20) - 1)


def _float(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    raw = f.raw(info.name)
    return dequantize(np.ascontiguousarray(raw), info.type).reshape(info.shape).astype(np.float32)


Found = dict[str, tuple[np.ndarray, np.ndarray, float]]  # tensor name -> (A, B, the adapter's own factor)


def _from_gguf(path: Path) -> tuple[Found, str, str]:
    """The pairs, and the file's task name and prompt prefix."""
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
            out[base] = (a, b, alpha / rank if alpha else 1.0)
        return out, str(f.get("adapter.lora.task_name", "")), str(f.get("adapter.lora.prompt_prefix", ""))


def _from_peft(folder: Path) -> Found:
    from ..convert.errors import ConvertError
    from ..convert.layout import text_name
    from ..convert.lora import WEIGHTS, load_adapter

    try:
        adapter, file = load_adapter(folder, 1.0)
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
    return load_adapters(adapters, tensors).factors


def load_adapters(adapters: Sequence[LoraSource], tensors: dict[str, TensorInfo]) -> Adapters:
    """`load_loras`, with the adapters themselves (their paths and scales, which may change)."""
    out: dict[str, list[LoraFactor]] = {}
    loaded = []
    for source, scale in adapters:
        path = Path(source).expanduser()
        task = prefix = ""
        if path.is_dir():
            found = _from_peft(path)
        elif path.is_file():
            try:
                found, task, prefix = _from_gguf(path)
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
        knob = AdapterScale(scale)
        for name, (a, b, s) in found.items():
            out.setdefault(name, []).append(LoraFactor(torch.from_numpy(a), torch.from_numpy(b), s, knob))
        loaded.append(Adapter(str(source), knob, task, prefix))
    return Adapters(tuple(loaded), out)
