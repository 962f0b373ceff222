"""A GGUF cut into parts, or parts joined into one file, as llama.cpp's llama-gguf-split does it
(`qvl gguf-split`): the same files, byte for byte.

Split: the tensors in file order, a new part every `max_tensors` tensors, or before a tensor that
would take a part's tensor data (each tensor padded to 32 bytes) past `max_size` bytes;
`no_tensor_first` leaves the first part with the metadata alone. Each part holds split.no,
split.tensors.count and split.count (in that order, after the first part's copy of the whole
file's metadata); its name is OUT-0000i-of-0000N.gguf. Merge: the first part's metadata with
split.count set to 0 (moved last, as ggml moves a key it sets), then every part's tensors in
order. The tensor bytes are copied as they are.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType as V

from ..runtime.gguf_file import SPLIT_KEYS, GGUFError, GGUFFile, part_name
from .errors import ConvertError
from .layout import OutTensor
from .metadata import KV
from .pipeline import Job, OutputFile
from .plan import PlannedTensor

DEFAULT_MAX_TENSORS = 128  # llama-gguf-split's default
ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT


def split_size(text: str) -> int:
    """llama-gguf-split's --split-max-size: N followed by M (10^6 bytes) or G (10^9)."""
    unit = {"M": 1000 * 1000, "G": 1000 * 1000 * 1000}.get(text[-1:])
    if unit is None or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise ConvertError(f"--split-max-size {text!r}: a positive whole number and M or G, e.g. 4G or 500M")
    return int(text[:-1]) * unit


def _planned(g: GGUFFile, name: str) -> PlannedTensor:
    t = g.tensors[name]
    return PlannedTensor(OutTensor(name, t.shape, name), t.type)


def _kvs(g: GGUFFile, skip: tuple[str, ...] = ()) -> list[KV]:
    return [KV(k, kv.value, kv.type, kv.sub_type) for k, kv in g.fields.items() if k not in skip]


def plan_split(g: GGUFFile, out: Path, max_tensors: int | None = None, max_size: int | None = None,
               no_tensor_first: bool = False) -> Job:
    """The parts of `g` (a whole file) as llama-gguf-split --split writes them to OUT-*-of-*.gguf."""
    if len(g.parts) > 1:
        raise ConvertError(f"{g.path}: a split model already (merge it first: qvl gguf-split --merge)")
    names = list(g.tensors)
    every = max_tensors or DEFAULT_MAX_TENSORS
    groups: list[list[str]] = [[]] if no_tensor_first else []  # the parts before the one being filled
    current: list[str] = []
    size = 0
    for i, name in enumerate(names):
        nbytes = -(-g.tensors[name].nbytes // ALIGN) * ALIGN
        if (size + nbytes > max_size) if max_size is not None else (i > 0 and i % every == 0):
            if not current:
                raise ConvertError(f"--split-max-size: '{name}' alone is over it: a part would hold no tensor")
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    n = len(groups)
    files = []
    for i, group in enumerate(groups):
        kvs = (_kvs(g, SPLIT_KEYS) if i == 0 else []) + [
            KV("split.no", i, V.UINT16), KV("split.tensors.count", len(names), V.INT32), KV("split.count", n, V.UINT16)]
        planned = [_planned(g, name) for name in group]
        files.append(OutputFile(out.with_name(part_name(out.name, i, n)), None, kvs, planned))
    return Job(g.path.parent, None, files)


def plan_merge(g: GGUFFile, out: Path) -> Job:
    """One file of a split model's parts (`g`, opened by its first), as llama-gguf-split --merge writes it."""
    if not g.get("split.count"):
        raise ConvertError(f"{g.path}: not a split model's first part (no split.count)")
    kvs = _kvs(g, ("split.count",)) + [KV("split.count", 0, V.UINT16)]
    return Job(g.path.parent, None, [OutputFile(out, None, kvs, [_planned(g, name) for name in g.tensors])])


def open_source(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise ConvertError(str(e)) from None
