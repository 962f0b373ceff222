"""LoRA adapters (PEFT's folders) merged into a checkpoint's weights as they are converted.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors`: for each adapted
`nn.Linear` a pair `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r), for an
adapted `nn.Embedding` `<module>.lora_embedding_A` (r, vocab) and `lora_embedding_B` (dim, r),
and whole tensors of the `modules_to_save` (or an embedding's `base_layer`, saved beside its
pair). Merged, as peft's `merge_and_unload` does: W + s (B A) for a linear (and for the patch
embedding's convolution, whose B is 1x1x1: A's kernels as rows), W + s (B A)^T for an embedding,
with s = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`; alpha_pattern and
rank_pattern pick a module's own, matched as peft matches them) times the user's scale. The sum
is made in float32 a slice of rows at a time, before the converter's quantization: the file is
the merged model's, as if peft had merged and saved it.

Adapters qvl cannot merge exactly are refused in one line naming the key: DoRA, LoRA biases,
other PEFT methods, a resized vocabulary, a tensor the
model does not have or does not convert (lm_head of a model that ties it to the embeddings).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError
from .safetensors_io import Checkpoint, canonical_name

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# key suffix -> (pair part, embedding)
_PARTS = {".lora_A.weight": ("a", False), ".lora_B.weight": ("b", False),
          ".lora_embedding_A": ("a", True), ".lora_embedding_B": ("b", True)}
_REFUSED = {".lora_B.bias": "LoRA biases (lora_bias)", ".lora_magnitude_vector": "DoRA (use_dora)"}


@dataclass(frozen=True)
class LoraPair:
    """One adapted tensor: the adapter's A and B tensors and the factor s of s (B A)."""

    a: str
    b: str
    scale: float
    embedding: bool  # nn.Embedding: the delta is (B A)^T


@dataclass(frozen=True)
class Adapter:
    folder: Path
    pairs: dict[str, LoraPair]  # by the base tensor's canonical name
    replaced: dict[str, str]  # base tensor -> the adapter's tensor that replaces it
    rank: int
    alpha: float

    def describe(self) -> str:
        whole = f", {len(self.replaced)} replaced" if self.replaced else ""
        return f"{self.folder}: {len(self.pairs)} matrices, rank {self.rank}, alpha {self.alpha:g}{whole}"


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's get_pattern_key: the first pattern that matches the module's name as a suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        if (folder / WEIGHTS).exists() or not folder.is_dir():
            raise ConvertError(f"{path}: not found (a LoRA adapter is a PEFT folder: {CONFIG} + {WEIGHTS})")
        raise ConvertError(f"{folder}: not a LoRA adapter folder (no {CONFIG})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(f"{path}: malformed JSON") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: not a JSON object")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise ConvertError(f"{path}: peft_type {cfg.get('peft_type')!r}: qvl merges LORA adapters only")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(key):
            raise ConvertError(f"{path}: {key} is set: {what} adapters are not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ConvertError(f"{path}: '{key}' must be a positive number, found {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ConvertError(f"{path}: '{key}' must be an object")
    return cfg


def _split_key(key: str, where: Path) -> tuple[str, str]:
    """An adapter tensor's key -> (module path, suffix), the module path without peft's prefix."""
    if not key.startswith(_PREFIX):
        raise ConvertError(f"{where}: tensor '{key}' is not a peft adapter tensor (no '{_PREFIX}' prefix)")
    rest = key[len(_PREFIX):]
    for suffix in (*_PARTS, *_REFUSED, ".base_layer.weight", ".base_layer.bias", ".weight", ".bias"):
        if rest.endswith(suffix):
            return rest[:-len(suffix)], suffix
    raise ConvertError(f"{where}: tensor '{key}': not a LoRA A/B pair or a saved module's weight")


def load_adapter(folder: Path, user_scale: float) -> tuple[Adapter, Checkpoint]:
    """Read a PEFT LoRA folder: its tensors' roles and factors (checked against the config), and
    the open file the merge reads them from."""
    folder = folder.expanduser()
    cfg = _config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        legacy = folder / "adapter_model.bin"
        hint = f" (it has {legacy.name}: save it with safe_serialization=True)" if legacy.exists() else ""
        raise ConvertError(f"{weights}: not found{hint}")
    file = Checkpoint(folder, [weights])
    try:
        parts: dict[str, dict[str, str]] = {}
        embedding: dict[str, bool] = {}
        replaced: dict[str, str] = {}
        for key in file.names():
            module, suffix = _split_key(key, weights)
            if suffix in _REFUSED:
                raise ConvertError(f"{weights}: tensor '{key}': {_REFUSED[suffix]} adapters are not supported")
            if suffix in _PARTS:
                part, emb = _PARTS[suffix]
                parts.setdefault(module, {})[part] = key
                embedding[module] = emb
            else:
                replaced[canonical_name(module + suffix.replace(".base_layer", ""))] = key
        pairs: dict[str, LoraPair] = {}
        r0, alpha0 = cfg["r"], cfg["lora_alpha"]
        for module, ab in parts.items():
            if set(ab) != {"a", "b"}:
                has, lacks = ("A", "B") if "a" in ab else ("B", "A")
                raise ConvertError(f"{weights}: '{module}' has lora_{has} but no lora_{lacks}")
            r = _pattern_value(cfg.get("rank_pattern") or {}, module, r0)
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0)
            a_shape, b_shape = file.shape(ab["a"]), file.shape(ab["b"])
            if len(a_shape) < 2 or len(b_shape) < 2 or any(k != 1 for k in b_shape[2:]) or (
                    embedding[module] and (len(a_shape), len(b_shape)) != (2, 2)):
                raise ConvertError(f"{weights}: '{module}': A {list(a_shape)} and B {list(b_shape)} are not "
                                   "a LoRA pair qvl merges")
            if a_shape[0] != r or b_shape[1] != r:
                raise ConvertError(f"{weights}: '{module}' has rank {a_shape[0]} (B: {b_shape[1]}), "
                                   f"{CONFIG} says {r}")
            scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r) * user_scale
            pairs[canonical_name(module + ".weight")] = LoraPair(ab["a"], ab["b"], scale, embedding[module])
    except BaseException:
        file.close()
        raise
    if not pairs and not replaced:
        file.close()
        raise ConvertError(f"{weights}: holds no LoRA tensors")
    return Adapter(folder, pairs, replaced, int(r0), float(alpha0)), file


def _delta_shape(file: Checkpoint, pair: LoraPair) -> tuple[int, ...]:
    a, b = file.shape(pair.a), file.shape(pair.b)
    return (a[1], b[0]) if pair.embedding else (b[0], *a[1:])


def check_adapter(adapter: Adapter, file: Checkpoint, expected: dict[str, tuple[int, ...]],
                  found: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the adapter changes is one the conversion writes, in that tensor's shape."""
    where = adapter.folder / WEIGHTS
    changes = [(name, _delta_shape(file, p), p.a) for name, p in adapter.pairs.items()]
    changes += [(name, file.shape(key), key) for name, key in adapter.replaced.items()]
    for name, shape, key in changes:
        if name not in expected:
            why = ("the model ties it to the token embeddings" if name == "lm_head.weight" and name in found
                   else "no such tensor in the model")
            raise ConvertError(f"{where}: '{key}' adapts '{name}': {why}")
        if tuple(shape) != tuple(expected[name]):
            what = " (a resized vocabulary)" if "embed_tokens" in name or "lm_head" in name else ""
            raise ConvertError(f"{where}: '{key}' makes '{name}' {list(shape)}, the model's is "
                               f"{list(expected[name])}{what}")


class MergedCheckpoint(Checkpoint):
    """A checkpoint read with adapters merged in: `read_rows` adds each adapter's delta to the
    rows it returns (in float32), or returns the adapter's own tensor where it replaces one."""

    def __init__(self, base: Checkpoint, adapters: list[tuple[Adapter, Checkpoint]]):
        self.folder = base.folder
        self.entries = base.entries
        self._maps = base._maps
        self.base = base
        self.adapters = adapters
        self._a: dict[tuple[int, str], np.ndarray] = {}

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """The base's rows, or the last adapter's that replaces them (as peft loads adapters one
        after the other), plus every adapter's delta."""
        whole = [(adapter, file) for adapter, file in self.adapters if name in adapter.replaced]
        if whole:
            adapter, file = whole[-1]
            data = file.read_rows(adapter.replaced[name], start, stop)
        else:
            data = self.base.read_rows(name, start, stop)
        for k, (adapter, file) in enumerate(self.adapters):
            pair = adapter.pairs.get(name)
            if pair is None:
                continue
            if pair.embedding:  # rows of (B A)^T: A's columns times B^T; A (r, vocab) kept
                a = self._a.get((k, name))
                if a is None:
                    a = self._a[(k, name)] = file.read(pair.a)
                delta = a[:, start:stop].T @ file.read(pair.b).T
            else:  # a convolution's (out, r, 1, 1, 1) B and (r, *kernel) A as matrices
                a = file.read(pair.a)
                delta = (file.read_rows(pair.b, start, stop).reshape(stop - start, -1) @ a.reshape(len(a), -1))
                delta = delta.reshape(data.shape)
            data = data + np.float32(pair.scale) * delta.astype(np.float32)
        return data

    def close(self) -> None:
        for _, file in self.adapters:
            file.close()
        self.base.close()


def open_merged(folder: Path, adapters: tuple[Adapter, ...]) -> Checkpoint:
    """The checkpoint in `folder`, read with the adapters merged in (as planned: `Job.lora`)."""
    base = Checkpoint(folder)
    if not adapters:
        return base
    return MergedCheckpoint(base, [(a, Checkpoint(a.folder, [a.folder / WEIGHTS])) for a in adapters])


def plan_adapters(folders: tuple[Path, ...], scale: float, expected: dict[str, tuple[int, ...]],
                  found: dict[str, tuple[int, ...]]) -> tuple[Adapter, ...]:
    """Read and check each adapter folder against the model's tensors (`expected` as the
    conversion writes them, `found` in the checkpoint)."""
    out = []
    for folder in folders:
        adapter, file = load_adapter(folder, scale)
        try:
            check_adapter(adapter, file, expected, found)
        finally:
            file.close()
        out.append(adapter)
    return tuple(out)

