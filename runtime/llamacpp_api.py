"""`qvl serve`'s endpoints of llama.cpp's server that clients use beside the completions: GET
/health, POST /tokenize and POST /detokenize (token counters, SillyTavern's llama.cpp backend).

    GET  /health        {"status": "ok"}
    POST /tokenize      {"content", "with_pieces", "add_special", "parse_special", "model"}
                        -> {"tokens": [id, ...]} or, with_pieces, [{"id", "piece"}, ...] (a piece
                        that is not whole UTF-8: its bytes as a list of numbers, as llama.cpp's)
    POST /detokenize    {"tokens": [id, ...], "model"} -> {"content"}
    POST /apply-template {"messages", "model"} (a chat completion's) -> {"prompt"}: the prompt the
                        chat template makes, each picture's place a <__media__> marker, to edit
                        and send to /completion with the pictures as its multimodal_data

The model is the request's `model`, else the one given to `qvl serve`. Qwen's tokenizer adds no
BOS, so add_special changes nothing; special tokens in the text (`<|im_start|>`) are read as
themselves (parse_special true, llama.cpp's default; false is refused)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .chat import chat_media, render, with_stored
from .llamacpp_completion import MEDIA_MARKER, PICTURE_SLOT
from .logprobs import speller
from .openai_api import conversation
from .server import Reply, RequestError, Service


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(400, f"{key}: true or false")
    return value


def tokenize(service: Service, body: dict[str, Any]) -> Reply:
    content = body.get("content")
    if not isinstance(content, str):
        raise RequestError(400, "content: a string")
    with_pieces = _flag(body, "with_pieces", False)
    _flag(body, "add_special", False)
    if not _flag(body, "parse_special", True):
        raise RequestError(400, "parse_special false: not supported (special tokens in the text are read as such)")
    model = service.use(body.get("model")).model
    ids = model.tokenizer.encode(content, add_special_tokens=False).ids if content else []
    if not with_pieces:
        return Reply({"tokens": ids})
    spell = speller(model.tokenizer)

    def piece(token: int) -> str | list[int]:
        data = spell(token)[1]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:  # part of a character
            return list(data)

    return Reply({"tokens": [{"id": t, "piece": piece(t)} for t in ids]})


def detokenize(service: Service, body: dict[str, Any]) -> Reply:
    tokens = body.get("tokens")
    model = service.use(body.get("model")).model
    vocab = model.cfg.n_vocab
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in tokens):
        raise RequestError(400, f"tokens: a list of token ids below {vocab}")
    return Reply({"content": model.tokenizer.decode(tokens, skip_special_tokens=False)})


def apply_template(service: Service, body: dict[str, Any]) -> Reply:
    loaded = service.use(body.get("model"))
    messages = with_stored(loaded.model.defaults, conversation(service, loaded, body))
    if chat_media(messages)[1]:
        raise RequestError(400, "messages: a video part (/completion takes pictures only)")
    return Reply({"prompt": render(loaded.model.chat_template, messages).replace(PICTURE_SLOT, MEDIA_MARKER)})


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("GET", "/health"): lambda s, b: Reply({"status": "ok"}),
    ("GET", "/v1/health"): lambda s, b: Reply({"status": "ok"}),
    ("POST", "/tokenize"): tokenize,
    ("POST", "/detokenize"): detokenize,
    ("POST", "/apply-template"): apply_template,
}
