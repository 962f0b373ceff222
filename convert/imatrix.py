"""An importance matrix (llama-imatrix's file) read as llama-quantize --imatrix reads it.

Two formats, as llama.cpp's common/imatrix-loader.cpp reads them:
- GGUF (llama-imatrix's default since 2025): per weight `<name>.in_sum2` (F32: the sums of the
  squared activations that met each column, one row per expert) and `<name>.counts` (F32: the
  activations summed, one per expert); keys imatrix.datasets, imatrix.chunk_count,
  imatrix.chunk_size (llama-quantize refuses a GGUF one without them). A column's value is its
  sum over its count (1 where the count is 0).
- the legacy `.dat`: int32 n_entries, then per entry int32 name length, the name, int32 ncall,
  int32 nval, float32 values[nval] (already means, times ncall); optionally int32 chunk count,
  int32 length and the dataset's name. A value is the stored one over ncall.

A value that is not finite is refused, as llama-quantize refuses it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..runtime.gguf_file import GGUFError, GGUFFile
from .errors import ConvertError

SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass(frozen=True)
class ImportanceMatrix:
    """`raw`: the file's own sums and counts per weight name, as stored (`legacy`: the .dat's means
    times ncall, and [ncall]); llama-imatrix --in-file adds them up. `values`, derived from them:
    the float32 value of each input column (experts one after another), as llama-quantize takes it."""
    path: Path
    raw: dict[str, tuple[np.ndarray, np.ndarray]]
    datasets: tuple[str, ...]
    chunk_count: int
    legacy: bool = False

    @cached_property
    def values(self) -> dict[str, np.ndarray]:
        return {name: _legacy_values(s, c) if self.legacy else _gguf_values(s, c) for name, (s, c) in self.raw.items()}


def _gguf_values(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each expert's sums over its count (1 where the count is 0)."""
    count = counts.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, sums.reshape(counts.size, -1) / count, np.float32(1)).astype(np.float32).reshape(-1)


def _legacy_values(sums: np.ndarray, ncall: np.ndarray) -> np.ndarray:
    """The .dat's values over its ncall (as they are where ncall is 0)."""
    return (sums / np.float32(ncall[0])).astype(np.float32) if ncall[0] > 0 else sums


def _gguf(path: Path, g: GGUFFile) -> ImportanceMatrix:
    keys = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
    if any(k not in g.fields for k in keys):
        raise ConvertError(f"{path}: an importance matrix without imatrix.datasets, imatrix.chunk_count and "
                           "imatrix.chunk_size (llama-quantize refuses it too)")
    names = {n[:-len(SUMS)] for n in g.tensors if n.endswith(SUMS)} | {n[:-len(COUNTS)] for n in g.tensors
                                                                        if n.endswith(COUNTS)}
    if not names:
        raise ConvertError(f"{path}: no {SUMS} / {COUNTS} tensors: not an importance matrix")
    raw = {}
    for name in sorted(names):
        sums, counts = g.tensors.get(name + SUMS), g.tensors.get(name + COUNTS)
        if sums is None or counts is None:
            raise ConvertError(f"{path}: '{name}' has {'no ' + SUMS if sums is None else 'no ' + COUNTS}")
        if sums.type.name != "F32" or counts.type.name != "F32":
            raise ConvertError(f"{path}: '{name}': its sums and counts must be F32")
        s = g.raw(name + SUMS).reshape(-1).view(np.float32)
        c = np.rint(g.raw(name + COUNTS).reshape(-1).view(np.float32).astype(np.float64))  # std::lround
        if c.size == 0 or s.size % c.size:
            raise ConvertError(f"{path}: '{name}': {s.size} sums for {c.size} counts")
        raw[name] = (s.copy(), c.astype(np.int64))
    datasets = g.get("imatrix.datasets")
    return ImportanceMatrix(path, raw, tuple(datasets) if isinstance(datasets, list) else (),
                            int(g.get("imatrix.chunk_count") or 0))


def _legacy(path: Path, data: bytes) -> ImportanceMatrix:
    at = 0

    def take(fmt: str) -> tuple:
        nonlocal at
        size = struct.calcsize(fmt)
        if at + size > len(data):
            raise ConvertError(f"{path}: cut short: not an importance matrix (GGUF or llama-imatrix's .dat)")
        out = struct.unpack_from(fmt, data, at)
        at += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > len(data):
        raise ConvertError(f"{path}: not an importance matrix (GGUF or llama-imatrix's .dat)")
    raw = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0 or length > 4096:
            raise ConvertError(f"{path}: not an importance matrix (GGUF or llama-imatrix's .dat)")
        name = take(f"<{length}s")[0].split(b"\0", 1)[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise ConvertError(f"{path}: '{name}' has {nval} values")
        take(f"<{4 * nval}x")  # cut short: an error before the values are read
        raw[name] = (np.frombuffer(data, np.float32, nval, at - 4 * nval).copy(), np.array([ncall], np.int64))
    chunk_count, datasets = 0, ()
    if at < len(data):
        (chunk_count,) = take("<i")
        if at + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - at:
                datasets = (take(f"<{length}s")[0].split(b"\0", 1)[0].decode("utf-8", "replace"),)
    return ImportanceMatrix(path, raw, datasets, chunk_count, legacy=True)


def read_imatrix(path: Path) -> ImportanceMatrix:
    """The importance matrix in `path` (GGUF or legacy .dat); ConvertError naming what is wrong."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ConvertError(f"{path}: {e.strerror or e}") from None
    if magic == b"GGUF":
        try:
            with GGUFFile(path) as g:
                matrix = _gguf(path, g)
        except GGUFError as e:
            raise ConvertError(str(e)) from None
    else:
        matrix = _legacy(path, path.read_bytes())
    for name, v in matrix.values.items():
        if not np.isfinite(v).all():
            raise ConvertError(f"{path}: '{name}' holds a value that is not finite (llama-quantize refuses it too)")
    return matrix
