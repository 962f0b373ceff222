"""Build tests/runtime/go_template_cases.json: templates and conversations, and what Go's own
text/template (and Ollama's way of running a TEMPLATE over a chat) made of them, as the oracle
of runtime/go_template.py and runtime/ollama_template.py.

    python scripts/build_go_template_cases.py      # needs Go (apt install golang-go)

The Go side is scripts/go_template_oracle/main.go. The expected outputs are Go's, never qvl's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "tests" / "runtime" / "go_template_cases.json"

QWEN25 = """{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

CHATML = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""

INST = "[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]{{ .Response }}</s>"

ROLES = """{{- range .Messages }}
{{ .Role }}: {{ .Content }}
{{- end }}
assistant:"""

PLAIN = [  # (template, data): text/template itself
    ("{{ range $i, $x := .L }}{{ $i }}={{ $x }} {{ end }}", {"L": ["a", "b", "c"]}),
    ("{{ range .L }}[{{ . }}]{{ else }}none{{ end }}", {"L": []}),
    ("{{ range $k, $v := .M }}{{ $k }}:{{ $v }};{{ end }}", {"M": {"b": 2, "a": 1, "c": 3}}),
    ("{{ range .L }}{{ if eq . \"d\" }}{{ break }}{{ end }}{{ if eq . \"b\" }}{{ continue }}{{ end }}{{ . }}{{ end }}",
     {"L": ["a", "b", "c", "d", "e"]}),
    ("{{ and 1 0 }}|{{ and 1 2 }}|{{ or 0 \"\" }}|{{ or 0 \"x\" }}|{{ not .E }}|{{ not 1 }}", {"E": ""}),
    ("{{ .Missing }}|{{ .A.B }}|{{ $.A.B }}", {"A": {"B": "deep"}}),
    ("{{ len .L }} {{ index .L 1 }} {{ index .M \"k\" }} {{ slice .L 1 }} {{ slice .L 0 2 }} {{ slice .S 1 3 }}",
     {"L": [10, 20, 30], "M": {"k": "v"}, "S": "hello"}),
    ("{{ eq .A \"x\" \"y\" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt 1 2 }} {{ ge 3 2 }}", {"A": "y"}),
    ("{{ print 1 2 \"a\" 3 \"b\" \"c\" }}|{{ println \"x\" 1 }}|{{ printf \"%s-%d-%v-%q\" \"s\" 7 true \"q\" }}", {}),
    ("{{ .S | printf \"<%s>\" }} {{ \"a\" | print \"b\" }} {{ .L | len }}", {"S": "s", "L": [1, 2]}),
    ("{{ with .A }}{{ . }}{{ else }}empty{{ end }}|{{ with .B }}{{ .C }}{{ end }}", {"A": "", "B": {"C": "c"}}),
    ("{{ if .A }}a{{ else if .B }}b{{ else if .C }}c{{ else }}d{{ end }}", {"A": 0, "B": [], "C": "yes"}),
    ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ $y := 3 }}{{ $y }}{{ end }}{{ $x }}", {}),
    ("a  \n  {{- .A -}}  \n  b {{- /* a comment */ -}} c {{/* another */}} d", {"A": "x"}),
    ("{{ json .V }} {{ .V | json }}", {"V": {"b": [1, 2], "a": "<&>"}}),
    ("{{ (index .L 0).Name }} {{ (slice .L 1).X }}", {"L": [{"Name": "n"}, {"Name": "m"}]}),
    ("{{ 1.5 }} {{ -3 }} {{ `raw \\n` }} {{ \"esc\\t\\\"q\\\"\" }} {{ true }}", {}),
    ("{{ nil }}", {}),
    ("{{ .L }} {{ .M }} {{ .B }}", {"L": [1, "a"], "M": {"x": 1}, "B": False}),
    # errors: each must be one too for qvl
    ("{{ if .A }}never closed", {}),
    ("{{ end }}", {}),
    ("{{ nosuchfunc 1 }}", {}),
    ("{{ $undefined }}", {}),
    ("{{ template \"x\" }}", {}),
    ("{{ .A.B }}", {"A": "string"}),
    ("{{ eq 1 \"1\" }}", {}),
    ("{{ index .L 5 }}", {"L": [1]}),
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>What?"},
     {"role": "assistant", "content": "A red square."}, {"role": "user", "content": "Sure?"}],
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}, {"role": "assistant", "content": "x"},
     {"role": "system", "content": "late"}, {"role": "user", "content": "three"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "r"}],
]


def main() -> None:
    cases: list[dict] = [{"template": t, "data": d} for t, d in PLAIN]
    for template in (QWEN25, CHATML, INST, ROLES):
        cases += [{"template": template, "messages": m} for m in CONVERSATIONS]
    run = subprocess.run(["go", "run", "main.go"], cwd=HERE / "go_template_oracle", input=json.dumps(cases),
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"go run failed: {run.stderr.strip()}")
    outputs = json.loads(run.stdout)
    for case, out in zip(cases, outputs, strict=True):
        case.update(out)
    OUT.write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(cases)} cases, {sum('error' in c for c in cases)} of them errors")


if __name__ == "__main__":
    main()
