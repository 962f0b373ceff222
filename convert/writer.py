"""Streaming GGUF output: header, metadata and tensor table first, then tensor data chunk by chunk.

gguf-py's GGUFWriter encodes the header, the key/values and the tensor infos (so our files are
laid out exactly like llama.cpp's); tensor data is then streamed in row chunks, quantized as it
goes, so no tensor is ever held whole in memory. Everything goes to `<out>.partial` and is renamed
into place by the caller only when every file of the conversion is complete.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from gguf import GGUFWriter, size_label

from .metadata import KV
from .plan import PlannedTensor
from .quant import quantize, row_bytes
from .safetensors_io import Checkpoint

# Rows [start, stop) of a planned tensor in its ggml type (uint8): the tensor data a stream writes
ChunkSource = Callable[[PlannedTensor, int, int], np.ndarray]

# Rows read and quantized per task: about 4M elements (16 MB of float32 input).
CHUNK_ELEMENTS = 1 << 22


def _byte_shape(p: PlannedTensor) -> tuple[int, ...]:
    return (*p.tensor.shape[:-1], row_bytes(p.qtype, p.tensor.row_length))


def _chunks(p: PlannedTensor) -> list[tuple[int, int]]:
    """Row ranges of the output tensor's first dimension; small or >2-D tensors in one piece."""
    t = p.tensor
    if len(t.shape) != 2:
        return [(0, t.shape[0] if t.shape else 1)]
    step = max(1, CHUNK_ELEMENTS // t.shape[1])
    return [(r, min(r + step, t.shape[0])) for r in range(0, t.shape[0], step)]


def tensor_bytes(ckpt: Checkpoint, p: PlannedTensor, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a planned tensor, converted to its ggml type (uint8)."""
    t = p.tensor
    if t.temporal is not None:
        data = ckpt.read(t.source)[:, :, t.temporal]
    else:
        data = ckpt.read_rows(t.source, t.row_start + start, t.row_start + stop)
    data = np.ascontiguousarray(data, dtype=np.float32)
    return quantize(data.reshape(-1, t.row_length), p.qtype).reshape(-1)


class GGUFStream:
    """One output file. `write(chunks, on_bytes, workers)` streams every tensor's data in plan
    order, rows [start, stop) at a time as `chunks(planned, start, stop)` gives them (with
    `tensor_bytes`: read from a checkpoint and quantized)."""

    def __init__(self, path: Path, arch: str | None, kvs: list[KV], plan: list[PlannedTensor]):
        """arch None: the file's metadata is `kvs` alone, in their order (a split model's part)."""
        self.path = path
        self.plan = plan
        self.writer = GGUFWriter(path, arch or "")
        if arch is None:
            self.writer.kv_data[0].pop("general.architecture", None)
        for kv in kvs:
            self.writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub)
        for p in plan:
            self.writer.add_tensor_info(p.tensor.name, _byte_shape(p), np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
        if arch is not None and not any(kv.key == "general.size_label" for kv in kvs):  # a requantized file keeps
            self.writer.add_size_label(size_label(*self.writer.get_total_parameter_count()))  # its source's, in place

    def write(self, chunks: ChunkSource, on_bytes: Callable[[PlannedTensor, int], None], workers: int) -> None:
        w = self.writer
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        w.write_padding(fout, fout.tell())  # the metadata padded to the alignment, as ggml pads it (no tensor too)
        written: dict[str, int] = {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for p, data in _ordered_results(pool, chunks, self.plan, 2 * workers):
                if p.tensor.name not in written:  # a tensor's first chunk
                    w.write_padding(fout, fout.tell())
                    written[p.tensor.name] = 0
                data.tofile(fout)
                written[p.tensor.name] += data.nbytes
                on_bytes(p, data.nbytes)
                if written[p.tensor.name] == p.nbytes:
                    w.write_padding(fout, p.nbytes)
        for p in self.plan:
            if written.get(p.tensor.name) != p.nbytes:
                raise AssertionError(f"{p.tensor.name}: wrote {written.get(p.tensor.name, 0)} bytes, "
                                     f"planned {p.nbytes}")
        fout.flush()
        os.fsync(fout.fileno())
        w.close()

    def abort(self) -> None:
        self.writer.close()


def _ordered_results(pool: ThreadPoolExecutor, chunks: ChunkSource, plan: list[PlannedTensor],
                     window: int) -> Iterator[tuple[PlannedTensor, np.ndarray]]:
    """Make the plan's chunks in parallel, up to `window` at a time across tensors (numpy releases
    the GIL while it quantizes; inside quant.pool.worker_processes processes do), and yield them
    in order."""
    pending: list[tuple[PlannedTensor, Future]] = []
    for p in plan:
        for start, stop in _chunks(p):
            pending.append((p, pool.submit(chunks, p, start, stop)))
            if len(pending) >= window:
                q, fut = pending.pop(0)
                yield q, fut.result()
    for q, fut in pending:
        yield q, fut.result()
