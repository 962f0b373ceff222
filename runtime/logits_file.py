"""llama-perplexity's file of a base model's log-probabilities (its `--kl-divergence-base FILE`):
a run of the base model writes it, a later run of a quantized model reads it back and measures
the KL divergence without the base in memory. Same layout as llama.cpp's, so that either side may
be llama.cpp's:

    "_logits_"  int32 n_ctx  int32 n_vocab  int32 n_chunk  int32 tokens[n_chunk * n_ctx]
    then for each chunk, for each scored position (n_ctx - 1 - n_ctx / 2 of them) a row of
    nv = 2 * ((n_vocab + 1) / 2) + 4 uint16: float32 scale, float32 min_log_prob, then one uint16
    step a token (padded to an even count), log p = scale * step + min_log_prob.

Each row keeps only the 16 nats below the row's largest logit (lower ones read back as the least
step); a reader leaves out the tokens at -16 or lower, as llama.cpp does. The file is written
whole or not at all (a temporary name beside it, renamed at the end).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .atomic import replacing

MAGIC = b"_logits_"
HEADER = len(MAGIC) + 3 * 4
SPAN = 16.0  # nats below the largest logit that a row keeps
FLOOR = -16.0  # a reader's least log-probability counted in the KL divergence (llama.cpp's)


class LogitsFileError(ValueError):
    """A log-probability file that cannot be written or read; one line naming the file."""


def row_width(n_vocab: int) -> int:
    """uint16 a row: the two float32 and the vocabulary's steps, padded to an even count."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored(n_ctx: int) -> int:
    """Positions scored in a chunk of n_ctx tokens (the second half, less the last)."""
    return n_ctx - 1 - n_ctx // 2


def encode(logits: torch.Tensor) -> np.ndarray:
    """Rows of float32 logits as llama.cpp's uint16 rows (its log_softmax, step by step in float32:
    the steps round half to even, the sum of exponentials in float64)."""
    x = logits.float().cpu().numpy()
    top, low = x.max(axis=1, keepdims=True), x.min(axis=1, keepdims=True)
    low = np.maximum(low, top - np.float32(SPAN))
    log_sum = np.log(np.exp((x - top).astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    min_log_prob = (low - top - log_sum).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    out = np.zeros((x.shape[0], row_width(x.shape[1])), np.uint16)
    out[:, :4] = np.concatenate([scale, min_log_prob], axis=1).view(np.uint16)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        steps = np.rint(inv * (x - low)).astype(np.float32)
    out[:, 4:4 + x.shape[1]] = np.where(x > low, steps, 0).astype(np.uint16)
    return out


def decode(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """uint16 rows back to float32 log-probabilities (scale * step + min_log_prob)."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    steps = rows[:, 4:4 + n_vocab].astype(np.float32)
    return torch.from_numpy(head[:, :1] * steps + head[:, 1:2])


@dataclass(frozen=True)
class Stored:
    """A log-probability file opened for reading: its chunk size, vocabulary, tokens and rows."""
    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: list[int]
    rows: np.ndarray  # uint16 [n_chunk * scored(n_ctx), row_width(n_vocab)], mapped from the file

    def log_probs(self, chunk: int, start: int, stop: int) -> torch.Tensor:
        """Chunk `chunk`'s scored rows start..stop (0 = the position n_ctx / 2) as log-probabilities."""
        at = chunk * scored(self.n_ctx)
        return decode(np.asarray(self.rows[at + start:at + stop]), self.n_vocab)


def read(path: Path) -> Stored:
    """Open a log-probability file (llama.cpp's or ours); LogitsFileError if it is not one, or is cut short."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except OSError as e:
        raise LogitsFileError(f"{path}: {e.strerror or e}") from None
    if len(head) < HEADER or head[:len(MAGIC)] != MAGIC:
        raise LogitsFileError(f"{path}: not a file of log-probabilities (llama-perplexity's --kl-divergence-base)")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, np.int32, 3, len(MAGIC)))
    if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
        raise LogitsFileError(f"{path}: a header of {n_ctx} tokens a chunk, {n_vocab} in the vocabulary, "
                              f"{n_chunk} chunks: not a file of log-probabilities")
    n_rows, width = n_chunk * scored(n_ctx), row_width(n_vocab)
    want = HEADER + 4 * n_chunk * n_ctx + 2 * n_rows * width
    if size != want:
        raise LogitsFileError(f"{path}: {size} bytes where {n_chunk} chunks of {n_ctx} tokens make {want} "
                              "(cut short, or not whole)")
    tokens = np.fromfile(path, np.int32, n_chunk * n_ctx, offset=HEADER)
    if tokens.min() < 0 or tokens.max() >= n_vocab:
        raise LogitsFileError(f"{path}: token ids outside the vocabulary of {n_vocab}")
    rows = np.memmap(path, np.uint16, "r", HEADER + 4 * len(tokens), (n_rows, width))
    return Stored(path, n_ctx, n_vocab, n_chunk, tokens.tolist(), rows)


def file_bytes(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    return HEADER + 4 * n_chunk * n_ctx + 2 * n_chunk * scored(n_ctx) * row_width(n_vocab)


@contextmanager
def writing(path: Path, n_ctx: int, n_vocab: int, tokens: list[int]) -> Iterator[Callable[[torch.Tensor], None]]:
    """Write `path`: the header and `tokens` (whole chunks of n_ctx), then each logits row given to
    the function yielded, in order. Renamed into place when every row is there; a run cut short
    (an error, ^C, too few rows) leaves nothing. LogitsFileError where the disk is too small."""
    n_chunk = len(tokens) // n_ctx
    want = file_bytes(n_ctx, n_vocab, n_chunk)
    folder = path.resolve().parent
    if path.is_dir():
        raise LogitsFileError(f"{path}: is a folder")
    if not folder.is_dir():
        raise LogitsFileError(f"{path}: no folder {folder}")
    free = shutil.disk_usage(folder).free
    if want > free:
        raise LogitsFileError(f"{path}: the log-probabilities of {n_chunk} chunks take {want / 2**30:.2f} GiB, "
                              f"{free / 2**30:.2f} GiB free there (fewer --chunks)")
    rows = [0]
    try:
        with replacing(path) as part:
            with open(part, "wb") as f:
                f.write(MAGIC + np.array([n_ctx, n_vocab, n_chunk], np.int32).tobytes())
                f.write(np.asarray(tokens[:n_chunk * n_ctx], np.int32).tobytes())

                def add(logits: torch.Tensor) -> None:
                    if logits.shape[1] != n_vocab:
                        raise LogitsFileError(f"{path}: rows of {logits.shape[1]} logits, the file's vocabulary "
                                              f"is {n_vocab}")
                    f.write(encode(logits).tobytes())
                    rows[0] += logits.shape[0]

                yield add
            if rows[0] != n_chunk * scored(n_ctx):
                raise LogitsFileError(f"{path}: {rows[0]} rows written of {n_chunk * scored(n_ctx)}")
    except OSError as e:
        raise LogitsFileError(f"{path}: {e.strerror or e}") from None
