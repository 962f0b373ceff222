"""Go templates (go_template.py) and Ollama's way of running a TEMPLATE (ollama_template.py), against
what Go's own text/template made of the same cases (go_template_cases.json, written by
scripts/build_go_template_cases.py with Go 1.19: the expected texts are Go's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvl.runtime.chat import DEFAULT_TEMPLATE, render
from qvl.runtime.go_template import TemplateError, execute, parse
from qvl.runtime.ollama_template import OllamaTemplate, stored_template

CASES = json.loads((Path(__file__).parent / "go_template_cases.json").read_text())


def _run(case):
    if "messages" in case:
        return OllamaTemplate(case["template"]).render(case["messages"])
    return execute(parse(case["template"]), case["data"])


@pytest.mark.parametrize("case", [c for c in CASES if "out" in c], ids=lambda c: c["template"][:40])
def test_renders_as_go_does(case):
    assert _run(case) == case["out"]


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=lambda c: c["template"][:40])
def test_fails_where_go_fails(case):
    with pytest.raises(TemplateError):
        _run(case)


QWEN25 = next(c["template"] for c in CASES if "messages" in c and "range $i, $_ := .Messages" in c["template"])
CHATML = next(c["template"] for c in CASES if "messages" in c and c["template"].startswith("{{ if .System }}"))


@pytest.mark.parametrize("template", [QWEN25, CHATML], ids=["qwen2.5 (.Messages)", "chatml (.Prompt, .Response)"])
def test_ollama_qwen_templates_write_what_transformers_template_writes(template):
    """With a system message (Ollama's have no default one), Ollama's Qwen templates and the
    checkpoint's Jinja agree, pictures included (put before the text, as transformers puts them)."""
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                    {"role": "assistant", "content": "A square."},
                    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "video"},
                                                 {"type": "text", "text": "this?"}]}]
    ours = OllamaTemplate(template)
    for n in (2, 4):
        assert render(ours, conversation[:n]) == render(DEFAULT_TEMPLATE, conversation[:n])


@pytest.mark.parametrize("text, says", [("{{ if .System }}x", "line 1: {{if}} without {{end}}"),
                                        ("a\n{{ .X | nosuch }}", "line 2: function 'nosuch' not defined"),
                                        ("{{ define \"x\" }}{{ end }}", "{{define}} is not supported"),
                                        ("{{ .Messages.Role }}", "can't evaluate field Role"),
                                        ("{{ .X", "unclosed action")])
def test_a_template_that_cannot_run_is_refused_with_its_line(text, says):
    with pytest.raises(TemplateError, match="^TEMPLATE: .*" + says.replace("{", r"\{").replace("}", r"\}")
                       .replace("(", r"\(").replace(")", r"\)")):
        stored_template(text, "TEMPLATE")


def test_an_error_as_it_runs_names_the_template():
    """A template that parses but fails on a conversation (at a request, not at create's trial)
    says TEMPLATE once, as the server's 400 and qvl-run's one line show it."""
    template = stored_template("{{ range .Messages }}{{ index $.Messages 3 }}{{ end }}", "TEMPLATE")
    with pytest.raises(TemplateError, match=r"^TEMPLATE: index 3 out of range$"):
        template.render([{"role": "user", "content": "hi"}])
    with pytest.raises(TemplateError, match=r"^TEMPLATE: can't evaluate field Role in"):
        stored_template("{{ .Messages.Role }}", "TEMPLATE")
    with pytest.raises(TemplateError, match=r"^TEMPLATE: line 1: cannot read the string"):
        stored_template('{{ "\\x41" }}', "TEMPLATE")
    with pytest.raises(TemplateError, match=r"missing value for parenthesized pipeline"):
        stored_template("{{ () }}", "TEMPLATE")


def test_no_template_is_none():
    assert stored_template(None, "x") is None and stored_template("  \n", "x") is None
