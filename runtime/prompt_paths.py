"""Pictures named in a question, as `ollama run` finds them: `qvl-run MODEL "What is in ./cat.png?"`
and a line typed in qvl-run's chat attach each image file whose path the text holds (a path
starting with ./, / or a drive letter, ending in .jpg, .jpeg, .png or .webp, shell escapes such as
`\\ ` read), and the path leaves the text. A path that names no file stays text."""

from __future__ import annotations

import os
import re

# Ollama's pattern (cmd/interactive.go): the shortest run from ./, / or \ to an image extension
IMAGE_PATH = re.compile(r"(?:[a-zA-Z]:)?(?:\./|/|\\)[\S\\ ]+?\.(?i:jpg|jpeg|png|webp)\b")
_ESCAPES = {"\\" + c: c for c in " ()[]{}$&;'*?~"} | {"\\\\": "\\"}
_ESCAPE = re.compile("|".join(re.escape(e) for e in _ESCAPES))


def unescaped(path: str) -> str:
    """A path as a shell would read its backslash escapes (`\\ ` a space, `\\(` a parenthesis, ...)."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], path)


def pictures_in(text: str) -> tuple[str, list[str]]:
    """`text` without the image files it names, and those files' paths, in order."""
    found = []
    for raw in IMAGE_PATH.findall(text):
        path = unescaped(raw)
        if not os.path.isfile(path) or path in found:
            continue
        found.append(path)
        for form in (f"'{path}'", f"'{raw}'", f'"{path}"', f'"{raw}"', raw):
            text = text.replace(form, "")
    return text.strip(), found
