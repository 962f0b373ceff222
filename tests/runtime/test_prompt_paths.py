"""Image files named in a question, found as `ollama run` finds them (prompt_paths.py)."""

from __future__ import annotations

import os

import pytest

from qvl.runtime.prompt_paths import pictures_in, unescaped


@pytest.fixture
def pics(tmp_path, monkeypatch):
    for name in ("cat.png", "a b.jpg", "(1).webp", "UP.JPEG"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_paths_found_and_taken_out(pics):
    assert pictures_in("What is in ./cat.png?") == ("What is in ?", ["./cat.png"])
    assert pictures_in(f"compare {pics}/a\\ b.jpg with {pics}/cat.png") == (
        "compare  with", [f"{pics}/a b.jpg", f"{pics}/cat.png"])
    assert pictures_in(f"'{pics}/a b.jpg' here") == ("here", [f"{pics}/a b.jpg"])  # quoted, spaces unescaped
    assert pictures_in(f'"{pics}/a b.jpg" here') == ("here", [f"{pics}/a b.jpg"])
    assert pictures_in("./\\(1\\).webp and ./UP.JPEG") == ("and", ["./(1).webp", "./UP.JPEG"])
    assert pictures_in("./cat.png twice ./cat.png") == ("twice", ["./cat.png"])


def test_what_names_no_file_stays_text(pics):
    for text in ("see ./none.png", "a folder ./dir.png", "cat.png without a slash", "./cat.pngx", "./cat.gif"):
        assert pictures_in(text) == (text, [])
    assert os.path.isdir("dir.png")


def test_unescaped():
    assert unescaped("a\\ b\\(c\\)\\[d\\]\\{e\\}\\$\\&\\;\\'\\*\\?\\~\\\\.png") == "a b(c)[d]{e}$&;'*?~\\.png"
