"""The console scripts' entry points. The CLI modules import torch, which takes seconds: a Ctrl-C
in that time (or anywhere a command does not handle it itself) ends the command with exit code
130 and no traceback, as it does during generation, conversion and pulls."""

from __future__ import annotations

import importlib
import sys


def _call(module: str, attr: str) -> None:
    try:
        getattr(importlib.import_module(module), attr)()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(130)


def qvl() -> None:
    _call("qvl.runtime.cli", "app")


def qvl_convert() -> None:
    _call("qvl.convert.cli", "main")


def qvl_run() -> None:
    _call("qvl.runtime.run_cli", "main")
