"""Chat prompts: the model's own Jinja template (from `tokenizer.chat_template`), rendered as
transformers' `apply_chat_template` renders it, or a stored TEMPLATE (ollama_template.py)."""

from __future__ import annotations

import re
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .go_template import TemplateError
from .ollama_template import OllamaTemplate

DEFAULT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video'"
    " or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def render(template: str | OllamaTemplate | None, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
           add_vision_id: bool = False) -> str:
    """The prompt of `messages` by the model's chat template (Jinja), or by a stored TEMPLATE
    (ollama_template.py: always up to the assistant's turn)."""
    if isinstance(template, OllamaTemplate):
        return template.render(messages)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        tpl = env.from_string(template or DEFAULT_TEMPLATE)
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    except jinja2.exceptions.TemplateError as e:  # its raise_exception, or a template that does not parse
        raise TemplateError(f"chat template (tokenizer.chat_template): {e}") from None


def user_content(prompt: str, n_images: int, n_videos: int) -> list[dict[str, Any]]:
    """A user turn's content parts: the images then the videos, then the text; or, where the
    prompt says `{image1}` / `{video2}`..., each in its place (a ValueError for one not given)."""
    parts = re.split(r"\{(image|video)(\d+)\}", prompt)
    if len(parts) == 1:
        media = ["image"] * n_images + ["video"] * n_videos
        return [{"type": kind} for kind in media] + [{"type": "text", "text": prompt}]
    content: list[dict[str, Any]] = []
    for k in range(0, len(parts), 3):
        if parts[k]:
            content.append({"type": "text", "text": parts[k]})
        if k + 2 < len(parts):
            kind, idx = parts[k + 1], int(parts[k + 2])
            have = n_images if kind == "image" else n_videos
            if not 1 <= idx <= have:
                raise ValueError(f"prompt refers to {{{kind}{idx}}} but {have} {kind}(s) were given")
            content.append({"type": kind})
    return content


def media_order(prompt: str, items: list, kind: str) -> list:
    """Media in the order the prompt's `{image2}`/`{video1}`... placeholders use them."""
    order = [int(m) - 1 for m in re.findall(r"\{" + kind + r"(\d+)\}", prompt)]
    return [items[i] for i in order if 0 <= i < len(items)] if order else items


def with_stored(defaults: dict[str, Any], messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with a stored model's SYSTEM first (where they have no system message) and its
    stored conversation (MESSAGE lines) after the system message."""
    if defaults.get("system") is not None and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": defaults["system"]}, *messages]
    if defaults.get("messages"):
        head = 1 if messages and messages[0].get("role") == "system" else 0
        messages = [*messages[:head], *defaults["messages"], *messages[head:]]
    return messages


def chat_media(messages: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """The images and the videos of the messages' content parts, in their order."""
    parts = [c for m in messages if isinstance(m["content"], list) for c in m["content"]]
    images = [c.get("image") or c.get("image_url") for c in parts
              if c.get("type") == "image" or "image" in c or "image_url" in c]
    return images, [c["video"] for c in parts if c.get("type") == "video" or "video" in c]
