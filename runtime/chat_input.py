"""What qvl-run's chat reads from the terminal, as `ollama run` reads it: lines edited with the
arrow keys (readline, where Python has it), earlier messages an up-arrow away (kept in
~/.qvl/history as Ollama keeps ~/.ollama/history; not with QVL_NOHISTORY set), and a message of
several lines between triple quotes (\"\"\"), which is never a /command."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

QUOTES = '"""'
HISTORY_LINES = 1000


def history_path() -> Path | None:
    """Where the chat's history is kept: ~/.qvl/history, or nowhere with QVL_NOHISTORY set (as OLLAMA_NOHISTORY)."""
    if os.environ.get("QVL_NOHISTORY"):
        return None
    return Path.home() / ".qvl" / "history"


def _readline() -> ModuleType | None:
    try:
        import readline
    except ImportError:  # Windows' Python: plain input()
        return None
    return readline


class LineReader:
    """The chat's messages from the terminal (input(), so EOFError at Ctrl-D, KeyboardInterrupt at
    Ctrl-C), with line editing, and a history read from and written back to `history`."""

    def __init__(self, history: Path | None):
        self.history = history
        self._readline = _readline()
        if self._readline is not None and history is not None:
            self._readline.set_history_length(HISTORY_LINES)
            try:
                self._readline.read_history_file(history)
            except OSError:  # none yet, or unreadable: a new history
                pass

    def read(self) -> tuple[str, bool]:
        """The next message, stripped, and whether it came between triple quotes (text, never a command)."""
        line = input("> ")
        if not line.lstrip().startswith(QUOTES):
            return line.strip(), False
        rest, lines = line.lstrip()[len(QUOTES):], []
        while not rest.rstrip().endswith(QUOTES):
            lines.append(rest)
            rest = input("... ")
        lines.append(rest.rstrip()[:-len(QUOTES)])
        return "\n".join(lines).strip(), True

    def close(self) -> None:
        """The history written back (where it cannot be, the chat still ends quietly)."""
        if self._readline is None or self.history is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(self.history)
        except OSError:
            pass
