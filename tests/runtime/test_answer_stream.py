"""qvl-run's answer as it comes (answer_stream.py): the pieces on stdout, the prompt's reading on
a terminal's stderr until the first piece, nothing there without one."""

from __future__ import annotations

import io

from qvl.runtime.answer_stream import CLEAR, write_answer
from qvl.runtime.live import PromptProgress


def test_pieces_and_the_prompts_reading():
    pieces = [PromptProgress(300, 100, 100, 0), PromptProgress(300, 100, 300, 40), "Hel", "lo", "."]
    out, err = io.StringIO(), io.StringIO()
    write_answer(iter(pieces), out, err)
    assert out.getvalue() == "Hello.\n"
    assert err.getvalue() == (CLEAR + "reading the prompt..." + CLEAR + "reading the prompt: 0 of 200 tokens"
                              + CLEAR + "reading the prompt: 200 of 200 tokens" + CLEAR)  # gone at the first piece
    out = io.StringIO()
    write_answer(iter(pieces), out, None)  # no terminal: no status, the same answer
    assert out.getvalue() == "Hello.\n"
    err = io.StringIO()
    write_answer(iter([PromptProgress(5, 0, 5, 1)]), io.StringIO(), err)  # no answer: the line still goes
    assert err.getvalue().endswith(CLEAR)


def test_qvl_run_streams_on_a_terminal(fixtures_dir, monkeypatch):
    """On a terminal qvl-run streams (as ollama run) with the reading shown on stderr; the answer
    is the one printed whole elsewhere, and --verbose's figures follow it as before."""
    from typer.testing import CliRunner

    from qvl.runtime import answer_stream, run_cli

    model = str(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    whole = CliRunner().invoke(run_cli.app, [model, "-p", "Hi", "-n", "5"])
    seen = []
    real = answer_stream.write_answer

    def on_a_terminal(pieces, out, status):
        seen.append(status is not None)
        real(pieces, out, status)

    monkeypatch.setattr(answer_stream, "write_answer", on_a_terminal)
    monkeypatch.setattr(answer_stream, "on_terminal", lambda stream: True)
    r = CliRunner().invoke(run_cli.app, [model, "-p", "Hi", "-n", "5", "--verbose"])
    assert r.exit_code == 0 and seen == [True] and r.stdout == whole.stdout
    assert "reading the prompt: " in r.stderr and "decode_tok_s" in r.stderr  # --verbose's figures after a streamed answer too
