"""Memory-mapped, row-sliced reading of (sharded) safetensors checkpoints.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
`{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the header), then
the raw data. We parse the header ourselves so that a truncated file or a header that does not
add up is caught before anything is written, and we read any range of rows of a tensor as
float32 without materialising the tensor. Pages are released after each read (MADV_DONTNEED)
so the resident set does not grow with the size of the model.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError

_DTYPES = {"BF16": (np.dtype("<u2"), 2), "F16": (np.dtype("<f2"), 2), "F32": (np.dtype("<f4"), 4)}

# transformers >= 4.52 saves `model.language_model.*` and `model.visual.*`; we read both.
_NEW_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def canonical_name(name: str) -> str:
    """The hub's legacy tensor name for either naming scheme."""
    for new, old in _NEW_PREFIXES:
        if name.startswith(new):
            return old + name[len(new) :]
    return name


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors file's header; errors name the file and the tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ConvertError(f"{path}: truncated safetensors file (no header)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > min(size - 8, 100 << 20):
                raise ConvertError(f"{path}: not a safetensors file or truncated (header length {hlen})")
            header = json.loads(f.read(hlen))
    except FileNotFoundError:
        raise ConvertError(f"{path}: shard not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConvertError(f"{path}: malformed safetensors header") from None
    base = 8 + hlen
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: malformed header entry for tensor '{name}'") from None
        if dtype not in _DTYPES:
            raise ConvertError(f"{path}: tensor '{name}' has dtype {dtype}; qvl reads BF16, F16 and F32")
        if e - b != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]:
            raise ConvertError(f"{path}: tensor '{name}' byte range does not match shape {list(shape)}")
        if base + e > size:
            raise ConvertError(f"{path}: truncated file: tensor '{name}' ends at byte {base + e}, file has {size}")
        entries[name] = TensorEntry(path, dtype, shape, base + b, base + e)
    return entries


def _natural_key(name: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class Checkpoint:
    """All tensors of a checkpoint folder, by canonical (legacy hub) name."""

    def __init__(self, folder: Path, shards: list[Path] | None = None):
        """The folder's model.safetensors (or its shards), or the given files."""
        self.folder = folder
        self.entries: dict[str, TensorEntry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for shard in self._shards() if shards is None else shards:
            for name, entry in read_header(shard).items():
                key = canonical_name(name)
                if key in self.entries:
                    raise ConvertError(f"{shard}: tensor '{name}' appears twice in the checkpoint")
                self.entries[key] = entry

    def _shards(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ConvertError(f"{index}: malformed index (no 'weight_map')") from None
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                raise ConvertError(f"{self.folder / missing[0]}: shard listed in {index.name} not found")
            return [self.folder / f for f in files]
        single = self.folder / "model.safetensors"
        if single.exists():
            return [single]
        shards = sorted(self.folder.glob("model-*-of-*.safetensors"))
        if shards:
            return shards
        raise ConvertError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")

    def names(self) -> list[str]:
        """Canonical names in natural order (layer 2 before layer 10)."""
        return sorted(self.entries, key=_natural_key)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (first dimension) as float32, shape (stop-start, *rest)."""
        e = self.entries[name]
        dtype, width = _DTYPES[e.dtype]
        row_elems = int(np.prod(e.shape[1:], dtype=np.int64)) if len(e.shape) > 1 else 1
        first = e.begin + start * row_elems * width
        count = (stop - start) * row_elems
        mm = self._map(e.file)
        raw = np.frombuffer(mm, dtype=dtype, count=count, offset=first)
        if e.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        del raw
        self._release(mm, first, count * width)
        return out.reshape((stop - start, *e.shape[1:]) if e.shape else ())

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        if not e.shape:
            return self.read_rows(name, 0, 1)
        return self.read_rows(name, 0, e.shape[0])

    @staticmethod
    def _release(mm: mmap.mmap, offset: int, length: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = offset // page * page
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, offset + length - lo)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()
