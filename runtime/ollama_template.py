"""A model's TEMPLATE (Ollama's Go template) as the prompt's renderer, run as Ollama runs one.

A template that reads `.Messages` is given the whole conversation (`.Messages`: Role, Content; the
system messages' contents joined as `.System`), consecutive messages of one role merged (tool
results apart). One that does not is run once a turn with `.System`, `.Prompt` and `.Response`, the
last turn's run cut after `{{ .Response }}` so that the answer follows. A picture goes where
transformers' chat template puts it, before the text of its message:
`<|vision_start|><|image_pad|><|vision_end|>` (a video's with `<|video_pad|>`).

A stored TEMPLATE (qvl create's, or a pulled model's) renders that model's prompts in place of
the GGUF's own chat template (transformers' Jinja); a run of a GGUF file uses the latter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .go_template import Action, Branch, Chain, Field, Pipe, TemplateError, Variable, execute, parse

VISION = {"image": "<|vision_start|><|image_pad|><|vision_end|>", "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def content_text(content: Any) -> str:
    """A message's content as one string: its text parts, and its pictures as their slots."""
    if isinstance(content, str):
        return content
    out = []
    for part in content or []:
        kind = part.get("type")
        if kind in VISION or "image" in part or "image_url" in part or "video" in part:
            out.append(VISION["video" if kind == "video" or "video" in part else "image"])
        else:
            out.append(part.get("text", ""))
    return "".join(out)


def _names_read(nodes: Any, found: set[str]) -> None:
    """Every field name the nodes read (lowercased), as Ollama's Template.Vars."""
    if isinstance(nodes, list):
        for n in nodes:
            _names_read(n, found)
    elif isinstance(nodes, (Field, Variable)):
        found.update(x.lower() for x in nodes.names)
    elif isinstance(nodes, Chain):
        found.update(x.lower() for x in nodes.names)
        _names_read(nodes.node, found)
    elif isinstance(nodes, Pipe):
        _names_read([a for c in nodes.cmds for a in c.args], found)
    elif isinstance(nodes, Action):
        _names_read(nodes.pipe, found)
    elif isinstance(nodes, Branch):
        _names_read([nodes.pipe, nodes.body, nodes.other or []], found)


class _Cut:
    """Ollama's cut of the last turn: every node after the first `.Response` field goes."""

    def __init__(self):
        self.cut = False

    def nodes(self, nodes: list[Any]) -> list[Any]:
        out = []
        for n in nodes:
            kept = self.node(n)
            if kept is not None:
                out.append(kept)
        return out

    def node(self, n: Any) -> Any:
        if self.cut:
            return None
        if isinstance(n, Branch):  # its pipeline is not looked into, as Ollama's deleteNode
            n.body = self.nodes(n.body)
            if n.other is not None:
                n.other = self.nodes(n.other)
        elif isinstance(n, Action):
            cmds = []
            for cmd in n.pipe.cmds:
                args = [a for a in cmd.args if self.arg(a)]
                if not args:
                    return None
                cmd.args = args
                cmds.append(cmd)
            n.pipe.cmds = cmds
        return n

    def arg(self, a: Any) -> bool:
        if self.cut:
            return False
        if isinstance(a, Field) and "Response" in a.names:
            self.cut = True
        return True


@dataclass
class OllamaTemplate:
    source: str

    def __post_init__(self):
        self.nodes = parse(self.source)
        found: set[str] = set()
        _names_read(self.nodes, found)
        self.reads_messages = "messages" in found
        self.last_turn = _Cut().nodes(copy.deepcopy(self.nodes))

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt of a conversation (transformers' message format) that the assistant answers next."""
        system, collated = [], []
        for m in messages:
            role, text = m.get("role", ""), content_text(m.get("content"))
            if role == "system":
                system.append(text)
            if collated and collated[-1]["Role"] == role and role != "tool":
                collated[-1]["Content"] += "\n\n" + text
            else:
                collated.append({"Role": role, "Content": text, "Images": [], "ToolCalls": None, "Thinking": ""})
        try:
            return self._render(collated, system)
        except TemplateError as e:
            raise TemplateError(f"TEMPLATE: {e}") from None

    def _render(self, collated: list[dict[str, Any]], system: list[str]) -> str:
        if self.reads_messages:
            return execute(self.nodes, {"System": "\n\n".join(system), "Messages": collated, "Tools": None,
                                        "Response": "", "Think": False, "IsThinkSet": False})
        out, turn = [], {"System": "", "Prompt": "", "Response": ""}
        for m in collated:  # a turn is run when a message after it starts another
            role = m["Role"]
            if (role == "system" and (turn["Prompt"] or turn["Response"])) or (role == "user" and turn["Response"]):
                out.append(execute(self.nodes, turn))
                turn = {"System": "", "Prompt": "", "Response": ""}
            key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
            if key is not None:
                turn[key] = m["Content"]
        out.append(execute(self.last_turn, turn))
        return "".join(out)


def stored_template(text: str | None, where: str) -> OllamaTemplate | None:
    """A stored TEMPLATE ready to render (None without one); a TemplateError names `where`."""
    if text is None or not text.strip():
        return None
    try:
        template = OllamaTemplate(text)
        template.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}])
    except TemplateError as e:
        raise TemplateError(f"{where}: {str(e).removeprefix('TEMPLATE: ')}") from None  # said once
    return template
