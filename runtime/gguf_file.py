"""A fast, memory-mapped GGUF reader.

gguf-py's GGUFReader builds a numpy view per array element, which takes seconds for the
450,000 strings of a Qwen vocabulary. This reader decodes metadata with `struct` in one pass and
maps tensor data lazily; values come back as plain Python objects (arrays of numbers as lists).

Layout (little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 kv count;
kv: string key, u32 type, value; tensor info: string name, u32 n_dims, u64 ne[n_dims],
u32 ggml type, u64 offset (relative to the aligned start of the data section).

A split model (llama.cpp's gguf-split, or convert_hf_to_gguf.py --split-max-size) is opened by
its first part, `NAME-00001-of-0000N.gguf`, as llama.cpp opens it: the metadata is the first
part's, the tensors are every part's (each part found by that name with its own number; its
split.no must say so; no name twice; split.tensors.count of them in all).
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")  # a split model's part: its number, the parts, tensors


def part_name(prefix: str, i: int, n: int) -> str:
    """llama.cpp's name of a split model's part i (from 0) of n: PREFIX-0000{i+1}-of-0000n.gguf."""
    return f"{prefix}-{i + 1:05d}-of-{n:05d}.gguf"


class GGUFError(ValueError):
    """Not a GGUF file, or a truncated / inconsistent one; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    offset: int  # absolute offset in the file
    nbytes: int
    part: int = 0  # which file of a split model holds it (0: the first)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first)."""
        return tuple(reversed(self.ne))


@dataclass(frozen=True)
class KeyValue:
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (string)")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: GGUFValueType) -> KeyValue:
        if vtype == GGUFValueType.STRING:
            return KeyValue(self.string(), vtype)
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(self.take("<I"))
            n = self.take("<Q")
            if sub == GGUFValueType.STRING:
                return KeyValue([self.string() for _ in range(n)], vtype, sub)
            if sub == GGUFValueType.ARRAY:
                return KeyValue([self.value(GGUFValueType.ARRAY).value for _ in range(n)], vtype, sub)
            dt = np.dtype(_NUMPY[sub])
            end = self.pos + n * dt.itemsize
            if end > len(self.buf):
                raise GGUFError(f"{self.path}: truncated GGUF header (array)")
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos = end
            return KeyValue(arr.tolist(), vtype, sub)
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.path}: unknown metadata value type {int(vtype)}")
        return KeyValue(self.take(_SCALARS[vtype]), vtype)


class GGUFFile:
    """Metadata and tensor table of a GGUF file; tensor data memory-mapped on demand."""

    def __init__(self, path: str | Path, part: int = 0):
        self.path = Path(path)
        self.parts: list[GGUFFile] = [self]  # a split model's files, this one first
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise GGUFError(f"{self.path}: file not found") from None
        except IsADirectoryError:
            raise GGUFError(f"{self.path}: is a folder, not a GGUF file") from None
        size = self.path.stat().st_size
        if size < 24:
            self._file.close()
            raise GGUFError(f"{self.path}: not a GGUF file (too short)")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(self._map)
        try:
            self._parse(_Cursor(view, self.path), size)
        except (UnicodeDecodeError, ValueError, struct.error) as e:
            if isinstance(e, GGUFError):
                raise
            raise GGUFError(f"{self.path}: malformed GGUF header ({e})") from None
        finally:
            view.release()
        try:
            self._open_parts(part)
        except GGUFError:
            self.close()
            raise

    def _open_parts(self, part: int) -> None:
        """A split model's other parts, as llama.cpp's loader finds and checks them."""
        count, no = self.get("split.count", 0), self.get("split.no", 0)
        if count <= 1:
            return
        m = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", self.path.name)
        first = part_name(m.group(1) if m else "NAME", 0, count)
        if no != part:
            raise GGUFError(f"{self.path}: part {no + 1} of {count} of a split model" + (
                f", not part {part + 1}" if part else f": open its first part, {first}"))
        if part:
            return
        if m is None or int(m.group(2)) != 1 or int(m.group(3)) != count:
            raise GGUFError(f"{self.path}: the first part of a split model of {count}: its name must be {first}, "
                            "its parts found by that name")
        for i in range(1, count):
            other = GGUFFile(self.path.with_name(part_name(m.group(1), i, count)), i)
            self.parts.append(other)
            for name, t in other.tensors.items():
                if name in self.tensors:
                    raise GGUFError(f"{other.path}: tensor '{name}' is in another part too")
                self.tensors[name] = TensorInfo(t.name, t.type, t.ne, t.offset, t.nbytes, i)
        expected = self.get("split.tensors.count")
        if expected != len(self.tensors):
            raise GGUFError(f"{self.path}: a split model of {expected} tensors, its {count} parts hold "
                            f"{len(self.tensors)}")

    @property
    def paths(self) -> list[Path]:
        """The model's files: this one, or a split model's parts in order."""
        return [f.path for f in self.parts]

    def _parse(self, c: _Cursor, size: int) -> None:
        if bytes(c.buf[:4]) != b"GGUF":
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic)")
        c.pos = 4
        self.version = c.take("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        self.fields: dict[str, KeyValue] = {}
        for _ in range(n_kv):
            key = c.string()
            self.fields[key] = c.value(GGUFValueType(c.take("<I")))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            ne = tuple(c.take("<Q") for _ in range(c.take("<I")))
            qtype = GGMLQuantizationType(c.take("<I"))
            infos.append((name, qtype, ne, c.take("<Q")))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        self.data_start = -(-c.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, qtype, ne, rel in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(ne, dtype=np.int64))
            nbytes = n // block * type_size
            info = TensorInfo(name, qtype, ne, self.data_start + rel, nbytes)
            if info.offset + nbytes > size:
                raise GGUFError(f"{self.path}: truncated file: tensor '{name}' ends at byte "
                                f"{info.offset + nbytes}, file has {size}")
            self.tensors[name] = info

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.fields.get(key)
        return default if kv is None else kv.value

    def require(self, key: str) -> Any:
        """A metadata value that must be there; a GGUFError naming the key and file otherwise."""
        kv = self.fields.get(key)
        if kv is None:
            raise GGUFError(f"{self.path}: missing metadata key '{key}'")
        return kv.value

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8, read-only view of the mapping), rows as the first axis."""
        t = self.tensors[name]
        data = np.frombuffer(self.parts[t.part]._map, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return data.reshape(*t.shape[:-1], -1) if len(t.ne) > 1 else data

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident memory (they stay in the page
        cache; a later read faults them back in). For weights that were copied elsewhere."""
        t = self.tensors[name]
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        self.parts[t.part]._map.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)

    @property
    def architecture(self) -> str | None:
        return self.get("general.architecture")

    def close(self) -> None:
        for f in self.parts[1:]:
            f.close()
        try:
            self._map.close()
        except BufferError:  # views from raw() still alive: the mapping closes when they go
            pass
        self._file.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
