"""qvl-run's answer as it comes, as `ollama run` shows one: on a terminal (or with --stream) the
pieces go to stdout as they are made; meanwhile a terminal's stderr says the prompt is being read
(its tokens read so far, as the generation reports them: live.PromptProgress), a line that goes
at the answer's first piece."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from .live import PromptProgress

CLEAR = "\r\033[K"  # back to the line's start, the line erased


def on_terminal(stream: TextIO) -> bool:
    return stream.isatty()


def write_answer(pieces: Iterable[str | PromptProgress], out: TextIO, status: TextIO | None) -> None:
    """`pieces` to `out` as they come, then a newline; with `status` (a terminal) the prompt's
    reading shown there until the first piece."""
    shown = _say(status, "reading the prompt...")
    for piece in pieces:
        if isinstance(piece, PromptProgress):
            total, done = piece.total - piece.cache, piece.processed - piece.cache
            shown = _say(status, f"reading the prompt: {done} of {total} tokens") or shown
            continue
        if shown and status is not None:
            status.write(CLEAR)
            status.flush()
            shown = False
        out.write(piece)
        out.flush()
    if shown and status is not None:
        status.write(CLEAR)
        status.flush()
    out.write("\n")


def _say(status: TextIO | None, text: str) -> bool:
    if status is None:
        return False
    status.write(CLEAR + text)
    status.flush()
    return True
