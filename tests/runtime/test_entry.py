"""Console scripts: each names a function that exists, and a Ctrl-C while a command imports or
runs ends it with exit code 130 and one line, not a traceback."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from qvl.runtime import entry

ROOT = Path(__file__).resolve().parents[2]


def test_every_console_script_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"qvl", "qvl-convert", "qvl-run"}
    for target in scripts.values():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


@pytest.mark.parametrize("script", [entry.qvl, entry.qvl_convert, entry.qvl_run])
def test_ctrl_c_while_importing_exits_130_without_traceback(monkeypatch, capsys, script):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry.importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as e:
        script()
    assert e.value.code == 130
    assert capsys.readouterr().err == "\ninterrupted\n"
