"""Ollama's `context` on /api/generate: the token ids of a conversation so far, sent back to go on.

A reply ends with `context`: the ids of its prompt, as rendered (one `<|image_pad|>` per image),
and of its answer, as Ollama makes it (tokenize(prompt + response)). A request that sends one back
is read after those tokens: the answer is closed and the new prompt follows as the next user turn,
as the chat template writes one after an assistant's answer. Unlike Ollama, which renders the
whole template again after the old answer (its system prompt a second time, the answer left
unclosed), the system prompt and a stored conversation stay where the context has them, and the
last generation's KV cache keeps the context from being read again (prompt_cache.py).

Token ids cannot carry a picture: the `images` of a request with a context are the whole
conversation's, in order, the context's images first (sent again), then the new prompt's. With
`raw` the prompt follows the context's text as it is. A request's `template` (Ollama's Go template,
ollama_template.py) renders its prompt in place of the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .chat import media_order, render, user_content
from .model import IMAGE_PAD, VIDEO_PAD, Model, ModelError
from .ollama_template import OllamaTemplate


class PromptError(ValueError):
    """A `context` (or a `template`) that cannot be used: its message names the field."""


_ANSWER = "\u2063qvl-answer\u2063"  # a mark no template writes of its own


@dataclass(frozen=True)
class Prompt:
    """What model.generate is given: the text, whether it is still to be rendered, the images
    in the order of its slots."""

    text: str
    template: bool
    images: list[Any]


def context_ids(value: Any) -> list[int]:
    """The request's `context`: a list of token ids (empty, null or absent: none)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise PromptError("context: a list of token ids, as a reply's context gives them")
    return value


def next_turn(template: str | OllamaTemplate | None, content: list[dict[str, Any]]) -> str:
    """What the chat template writes after an assistant's answer when the user says `content`:
    the answer's end, the user turn, the assistant's start."""
    text = render(template, [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ANSWER},
                             {"role": "user", "content": content}])
    at = text.find(_ANSWER)
    if at < 0:
        raise PromptError("context: this model's chat template does not write an assistant's answer as given, "
                           "so a conversation cannot go on from its tokens; send the messages to /api/chat")
    return text[at + len(_ANSWER):]


def request_prompt(model: Model, context: list[int], prompt: str, images: list[Any], raw: bool, system: str | None,
                   template: OllamaTemplate | None) -> Prompt:
    """What a /api/generate request asks: its prompt after the `context` if any, rendered by the
    request's `template` (Ollama's, in place of the model's) if any."""
    if context:
        return continued(model, context, prompt, images, raw, template or model.chat_template)
    if raw or template is None:
        return Prompt(prompt, not raw, images)
    try:
        text = _user_turn(model, template, prompt, len(images), system)
    except ModelError as e:
        raise PromptError(str(e)) from None
    return Prompt(text, False, media_order(prompt, images, "image"))


def _user_turn(model: Model, template: str | OllamaTemplate | None, prompt: str, n_images: int,
               system: str | None) -> str:
    """A user turn rendered by `template` as model.generate renders one: the model's stored
    SYSTEM where the request gives none, and its stored conversation first (Model.messages_for)."""
    system = system if system is not None else model.defaults.get("system")
    return render(template, model.messages_for(prompt, n_images, system))


def continued(model: Model, context: list[int], prompt: str, images: list[Any], raw: bool,
              template: str | OllamaTemplate | None) -> Prompt:
    """The prompt of a request that sends back `context` (non-empty), its new turn as `template` writes it."""
    n_vocab = model.cfg.n_vocab
    bad = next((t for t in context if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise PromptError(f"context: token id {bad} is not in the model's vocabulary (0 to {n_vocab - 1})")
    head = model.tokenizer.decode(context, skip_special_tokens=False)
    pad = model.tokenizer.token_to_id(IMAGE_PAD)
    old = sum(1 for t in context if t == pad)
    if model.tokenizer.token_to_id(VIDEO_PAD) in context:
        raise PromptError("context: holds a video's tokens, which /api/generate cannot be given again; "
                           "send the messages to /api/chat")
    if len(images) < old:
        raise PromptError(f"context: holds {old} image(s) and {len(images)} came with the request; "
                           "token ids cannot carry a picture: send the context's images again, first in images")
    if raw:
        return Prompt(head + prompt, False, images)
    new = images[old:]
    try:
        content = user_content(prompt, len(new), 0)
    except ValueError as e:
        raise PromptError(str(e)) from None
    return Prompt(head + next_turn(template, content), False,
                  images[:old] + media_order(prompt, new, "image"))


def rendered(model: Model, prompt: Prompt, system: str | None) -> str:
    """The prompt's text as the model reads it (the chat template's, unless given rendered)."""
    if not prompt.template:
        return prompt.text
    return _user_turn(model, model.chat_template, prompt.text, len(prompt.images), system)


def reply_context(model: Model, text: str, answer: str) -> list[int]:
    """A reply's context: the ids of its rendered prompt then its answer (Ollama's tokenize(prompt + response))."""
    return model.tokenizer.encode(text + answer, add_special_tokens=False).ids
