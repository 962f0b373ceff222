"""An importance matrix of a model over a text, as llama-imatrix computes it: for every weight
matrix of the decoder's blocks, the sum over the text's tokens of the square of each input column
(what `qvl quantize --imatrix` then weighs the quantizers by), and how many tokens it summed.

The text is read in chunks of `ctx` tokens, each from an empty cache (as llama-perplexity reads
them). Each block's matrices are watched while the model runs: attn_q / attn_k / attn_v take the
normalized input, attn_output the attention's output, ffn_gate / ffn_up the normalized residual,
ffn_down the gated product; output.weight (with `output`) the final normalized states. A product
of fewer than 16 rows is not counted, as llama-imatrix counts none (a prompt's chunks are
longer). The sums are float64 here (llama-imatrix's float32: its last digits differ).

The file is llama-imatrix's GGUF: general.type "imatrix", imatrix.datasets (the text's path),
imatrix.chunk_count, imatrix.chunk_size, and per weight `<name>.in_sum2` (F32 [n_in]) and
`<name>.counts` (F32 [1]), by name; written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..convert.imatrix import ImportanceMatrix
from .atomic import gguf_written
from .model import Model

MIN_ROWS = 16  # llama-imatrix's: smaller products are not counted
WATCHED = {"qkv": ("attn_q", "attn_k", "attn_v"), "wo": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
           "down": ("ffn_down",)}


class ImatrixError(ValueError):
    """An importance matrix that cannot be computed or written; one line."""


@dataclass
class Sums:
    """The running sums of squared inputs (float64, per weight name) and the rows summed."""
    squares: dict[str, torch.Tensor]
    rows: dict[str, int]

    def add(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        if x.shape[0] < MIN_ROWS:
            return
        s = x.detach().double().square().sum(dim=0).cpu()
        for name in names:
            self.squares[name] = self.squares[name] + s if name in self.squares else s.clone()
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]


class _Watched:
    """A layer's matrix (or stack of matrices) while the sums are taken: its products record
    their input's squared columns under the weights' names, then run as they do."""

    def __init__(self, inner: object, names: tuple[str, ...], sums: Sums):
        self._inner, self._names, self._sums = inner, names, sums

    def __getattr__(self, attr: str):
        found = getattr(self._inner, attr)
        if attr not in ("matmul", "matmul_norm", "swiglu"):
            return found

        def watched(x: torch.Tensor, *rest, **named):  # the product's own arguments, passed on unchanged
            self._sums.add(self._names, x)
            return found(x, *rest, **named)

        return watched


def merge(sums: Sums, matrix: ImportanceMatrix, chunk_size: int) -> None:
    """Add an importance matrix file's sums and counts to `sums`, as llama-imatrix --in-file
    does: a GGUF one's as they are (float32 additions), a legacy one's means times ncall times
    `chunk_size` (its sums rebuilt); ImatrixError where a matrix's width differs or it has experts."""
    for name, (s, c) in matrix.raw.items():
        if c.size != 1:
            raise ImatrixError(f"{matrix.path}: '{name}' has {c.size} experts: qvl's models have none")
        add = torch.from_numpy(s.astype(np.float32) * (np.float32(chunk_size) if matrix.legacy else np.float32(1)))
        count = int(c[0]) * (chunk_size if matrix.legacy else 1)
        have = sums.squares.get(name)
        if have is not None and have.numel() != add.numel():
            raise ImatrixError(f"{matrix.path}: '{name}' has {add.numel()} sums, the others {have.numel()}")
        sums.squares[name] = add.double() if have is None else (have.float() + add).double()  # float32 adds
        sums.rows[name] = sums.rows.get(name, 0) + count


def collect(model: Model, ids: list[int], ctx: int, n_chunks: int, output: bool = False,
            each: Callable[[int, int], None] | None = None, sums: Sums | None = None) -> Sums:
    """The sums over the first `n_chunks` chunks of `ctx` tokens of `ids` (added to `sums`, e.g.
    merged files'); `each(i, n)` after chunk i."""
    sums = sums if sums is not None else Sums({}, {})
    layers = model.decoder.layers
    kept = [{attr: getattr(layer, attr) for attr in WATCHED} for layer in layers]
    try:
        for i, layer in enumerate(layers):
            for attr, names in WATCHED.items():
                setattr(layer, attr, _Watched(kept[i][attr], tuple(f"blk.{i}.{n}.weight" for n in names), sums))
        for c in range(n_chunks):
            hidden = model.token_hidden(ids[c * ctx:(c + 1) * ctx])
            if output:
                sums.add(("output.weight",), torch.cat(hidden))
            if each is not None:
                each(c, n_chunks)
    finally:
        for i, layer in enumerate(layers):
            for attr, inner in kept[i].items():
                setattr(layer, attr, inner)
    missing = [f"blk.{i}.{n}.weight" for i in range(len(layers)) for names in WATCHED.values() for n in names
               if f"blk.{i}.{n}.weight" not in sums.rows]
    if missing:
        raise ImatrixError(f"no input reached {missing[0]} (and {len(missing) - 1} more): "
                           "its layer ran outside what qvl imatrix watches (run with --cpu)")
    return sums


def chunk_count(sums: Sums, chunk_size: int) -> int:
    """llama-imatrix's imatrix.chunk_count: the largest count over the chunk size."""
    return max(sums.rows.values(), default=0) // chunk_size


def write(path: Path, sums: Sums, datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    """llama-imatrix's GGUF file of the sums: a temporary name beside `path`, renamed when whole."""
    from gguf import GGUFValueType

    try:
        with gguf_written(path, "imatrix") as w:
            w.kv_data[0].pop("general.architecture", None)  # llama-imatrix's file has none
            w.add_key_value("general.type", "imatrix", GGUFValueType.STRING)
            w.add_key_value("imatrix.datasets", datasets, GGUFValueType.ARRAY, GGUFValueType.STRING)
            w.add_key_value("imatrix.chunk_count", chunk_count, GGUFValueType.UINT32)
            w.add_key_value("imatrix.chunk_size", chunk_size, GGUFValueType.UINT32)
            for name in sorted(sums.squares):
                w.add_tensor(f"{name}.in_sum2", sums.squares[name].float().numpy())  # [n_in]: one matrix
                w.add_tensor(f"{name}.counts", np.array([sums.rows[name]], np.float32))
    except OSError as e:
        raise ImatrixError(f"{path}: {e.strerror or e}") from None
