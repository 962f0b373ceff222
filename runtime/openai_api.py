"""`qvl serve`'s OpenAI endpoints: /v1/models, /v1/chat/completions (content parts "text" and
"image_url" as data: URLs, response_format, logprobs / top_logprobs) and /v1/completions (a
prompt continued as it is, no chat template; logprobs and echo, so that a prompt can be scored),
on server.Service's loaded model. Streams are server-sent events (a stream's logprobs come in
its last chunk)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from .json_format import piece_bytes
from .logprobs import MAX_TOP, TokenLogprob, prompt_logprobs
from .model import Model
from .server import Loaded, Reply, RequestError, Service, _messages, answer_format, generation_options


def models(service: Service, body: dict[str, Any]) -> Reply:
    return Reply({"object": "list", "data": [{"id": str(e.name), "object": "model", "created": int(e.modified),
                                              "owned_by": "library"} for e in service.store.list()]})


def _options(loaded: Loaded, service: Service, body: dict[str, Any], default_tokens: int | None) -> dict[str, Any]:
    """Model.generate's keyword arguments from OpenAI's names over the stored parameters."""
    options = {k: body[k] for k in ("temperature", "top_p", "seed", "stop") if body.get(k) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens", default_tokens))
    if limit is not None:
        options["num_predict"] = limit
    return generation_options(loaded.params, options, service.config.ctx_size)


def _answer(service: Service, loaded: Loaded, pieces: Iterator[str], body: dict[str, Any], kind: str,
            choice: Callable[[str, str | None, bool], dict[str, Any]]) -> Reply:
    """A chat.completion / text_completion reply, or its stream of chunks; `choice(text, reason,
    first)` is a choice (a chunk's when streaming) with that text."""
    name, created = service._name(loaded), int(time.time())
    cid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{next(service._ids)}"

    def finish() -> str:
        g = loaded.model.last_generation
        assert g is not None
        return "stop" if g.ended else "length"

    def usage() -> dict[str, int]:
        g = loaded.model.last_generation
        assert g is not None
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids),
                "total_tokens": g.prompt_tokens + len(g.token_ids)}

    if not body.get("stream", False):
        text = "".join(pieces)
        return Reply({"id": cid, "object": kind, "created": created, "model": name,
                      "choices": [choice(text, finish(), False)], "usage": usage()})

    def chunk(parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": cid, "object": f"{kind}.chunk" if kind == "chat.completion" else kind, "created": created,
                "model": name, "choices": parts}

    stream_options = body.get("stream_options")
    with_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))

    def events() -> Iterator[dict[str, Any]]:
        if kind == "chat.completion":
            yield chunk([choice("", None, True)])
        for piece in pieces:
            yield chunk([choice(piece, None, False)])
        yield chunk([choice("", finish(), False)])
        if with_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
            yield {**chunk([]), "usage": usage()}

    return Reply(events=events(), sse=True)


def _one_choice(body: dict[str, Any]) -> None:
    if body.get("n", 1) != 1:
        raise RequestError(400, "n: one choice a request")


def _top(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP:
        raise RequestError(400, f"{where} {value!r}: 0 to {MAX_TOP}")
    return value


def _spell(model: Model) -> Callable[[int], tuple[str, bytes]]:
    """A token's text and its bytes (a byte-level token may hold part of a character); the
    tokenizer's added tokens (their text as it is) looked up once, not a token at a time."""
    added = set(model.tokenizer.get_added_tokens_decoder())

    def piece(token: int) -> tuple[str, bytes]:
        text = model.tokenizer.id_to_token(token) or ""
        data = None if token in added else piece_bytes(text)
        return (text, text.encode()) if data is None else (data.decode(errors="replace"), data)

    return piece


def _chat_logprobs(model: Model) -> dict[str, Any]:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]} of the last generation."""
    g = model.last_generation
    assert g is not None and g.logprobs is not None
    piece = _spell(model)

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text, data = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                        for t in g.logprobs]}


def chat(service: Service, body: dict[str, Any]) -> Reply:
    _one_choice(body)
    loaded = service.use(body.get("model"))
    messages = _messages(body.get("messages"), None)
    if loaded.system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": loaded.system})
    kwargs = _options(loaded, service, body, None)
    top = _top(body.get("top_logprobs") or 0, "top_logprobs") if body.get("logprobs") else None
    pieces = loaded.model.chat(messages, stream=True, format=answer_format(body), logprobs=top, **kwargs)
    streaming = bool(body.get("stream", False))

    def choice(text: str, reason: str | None, first: bool) -> dict[str, Any]:
        scores = _chat_logprobs(loaded.model) if top is not None and reason is not None else None
        if not streaming:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": scores,
                    "finish_reason": reason}
        delta = {"role": "assistant", "content": ""} if first else {} if reason else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": scores, "finish_reason": reason}

    return _answer(service, loaded, pieces, body, "chat.completion", choice)


COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions


def complete(service: Service, body: dict[str, Any]) -> Reply:
    """The legacy completions: the prompt continued as it is (no chat template, no system prompt)."""
    loaded = service.use(body.get("model"))
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(400, "prompt: a string (one prompt a request)")
    for key in ("suffix", "best_of"):
        if body.get(key) not in (None, 1, ""):
            raise RequestError(400, f"{key}: not supported by qvl serve")
    _one_choice(body)
    top = None if body.get("logprobs") is None else _top(body["logprobs"], "logprobs")
    echo = bool(body.get("echo", False))
    if echo and body.get("stream", False):
        raise RequestError(400, "echo: not with stream")
    kwargs = _options(loaded, service, body, COMPLETION_TOKENS)
    model = loaded.model
    # echo: the prompt's own tokens scored first (a separate pass over it, every position's logits)
    prompt_ids, prompt_scores = prompt_logprobs(model, prompt, top or 0) if echo and top is not None else ([], [])
    if echo and kwargs["max_new_tokens"] == 0:  # scoring only, as lm-evaluation-harness asks
        ids = prompt_ids or model.tokenize(prompt, [])[0]
        return Reply({"id": f"cmpl-{next(service._ids)}", "object": "text_completion", "created": int(time.time()),
                      "model": service._name(loaded),
                      "choices": [{"index": 0, "text": prompt, "finish_reason": "length",
                                   "logprobs": _legacy(model, prompt_ids, prompt_scores) if top is not None else None}],
                      "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}})
    pieces = model.generate(prompt, stream=True, template=False, format=answer_format(body), logprobs=top, **kwargs)

    def choice(text: str, reason: str | None, first: bool) -> dict[str, Any]:
        scores = None
        if top is not None and reason is not None:
            g = model.last_generation
            assert g is not None and g.logprobs is not None
            scores = _legacy(model, prompt_ids + g.token_ids, prompt_scores + list(g.logprobs))
        return {"index": 0, "text": (prompt if echo else "") + text, "logprobs": scores, "finish_reason": reason}

    return _answer(service, loaded, pieces, body, "text_completion", choice)


def _legacy(model: Model, ids: list[int], scores: list[TokenLogprob | None]) -> dict[str, Any]:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    piece = _spell(model)
    tokens = [piece(t)[0] for t in ids]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": [None if s is None else {piece(i)[0]: v for i, v in s.top} for s in scores],
            "text_offset": offsets}


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("GET", "/v1/models"): models,
    ("POST", "/v1/chat/completions"): chat,
    ("POST", "/v1/completions"): complete,
}
