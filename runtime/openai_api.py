"""`qvl serve`'s OpenAI endpoints: /v1/models, /v1/chat/completions (content parts "text" and
"image_url" as data: URLs, response_format, logprobs / top_logprobs) and /v1/completions (a
prompt continued as it is, no chat template; logprobs and echo, so that a prompt can be scored),
on server.Service's loaded model. Streams are server-sent events, each chunk with the logprobs of
the tokens scored since the one before."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

from .logprobs import Speller, TokenLogprob, entries, new_scores, prompt_logprobs, speller
from .server import (Loaded, Reply, RequestError, Service, _messages, answer_format, generation_options,
                     top_logprobs)


def models(service: Service, body: dict[str, Any]) -> Reply:
    return Reply({"object": "list", "data": [{"id": str(e.name), "object": "model", "created": int(e.modified),
                                              "owned_by": "library"} for e in service.store.list()]})


def _options(loaded: Loaded, service: Service, body: dict[str, Any], default_tokens: int | None) -> dict[str, Any]:
    """Model.generate's keyword arguments from OpenAI's names over the stored parameters."""
    options = {k: body[k] for k in ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")
               if body.get(k) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens", default_tokens))
    if limit is not None:
        options["num_predict"] = limit
    kwargs = generation_options(loaded.params, options, service.config.ctx_size)
    if body.get("logit_bias") is not None:  # {"token id": bias}: Model.generate checks it
        if not isinstance(body["logit_bias"], dict):
            raise RequestError(400, "logit_bias: a map of token ids to biases")
        kwargs["logit_bias"] = body["logit_bias"]
    if body.get("ignore_eos"):  # llama.cpp server's and vLLM's: the end-of-turn tokens never chosen
        kwargs["logit_bias"] = {**kwargs.get("logit_bias", {}), **{str(t): float("-inf") for t in loaded.model.stop_ids}}
    return kwargs


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


def chat(service: Service, body: dict[str, Any]) -> Reply:
    _one_choice(body)
    loaded = service.use(body.get("model"))
    messages = _messages(body.get("messages"), None)
    if loaded.system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": loaded.system})
    kwargs = _options(loaded, service, body, None)
    top = top_logprobs(body.get("top_logprobs") or 0, "top_logprobs") if body.get("logprobs") else None
    pieces = loaded.model.chat(messages, stream=True, format=answer_format(body), logprobs=top, **kwargs)
    streaming = bool(body.get("stream", False))

    piece, sent = speller(loaded.model.tokenizer), [0]

    def choice(text: str, reason: str | None, first: bool) -> dict[str, Any]:
        scores = None
        if top is not None and not streaming:
            g = loaded.model.last_generation
            assert g is not None and g.logprobs is not None
            scores = {"content": entries(piece, g.logprobs)}
        elif top is not None and not first and (new := new_scores(loaded.model, sent)):
            scores = {"content": entries(piece, new)}  # a chunk's: the tokens scored since the last chunk
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
    top = None if body.get("logprobs") is None else top_logprobs(body["logprobs"], "logprobs")
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
                                   "logprobs": _legacy(speller(model.tokenizer), prompt_ids, prompt_scores)
                                   if top is not None else None}],
                      "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}})
    pieces = model.generate(prompt, stream=True, template=False, format=answer_format(body), logprobs=top, **kwargs)
    piece, sent, offset = speller(model.tokenizer), [0], [0]
    streaming = bool(body.get("stream", False))

    def choice(text: str, reason: str | None, first: bool) -> dict[str, Any]:
        scores = None
        if top is not None and not streaming:
            g = model.last_generation
            assert g is not None and g.logprobs is not None
            scores = _legacy(piece, prompt_ids + g.token_ids, prompt_scores + list(g.logprobs))
        elif top is not None and (new := new_scores(model, sent)):  # a chunk's, text_offset running on
            scores = _legacy(piece, [s.token for s in new], list(new), offset[0])
            offset[0] = scores["text_offset"][-1] + len(scores["tokens"][-1])
        return {"index": 0, "text": (prompt if echo else "") + text, "logprobs": scores, "finish_reason": reason}

    return _answer(service, loaded, pieces, body, "text_completion", choice)


def _legacy(piece: Speller, ids: list[int], scores: list[TokenLogprob | None],
            start: int = 0) -> dict[str, Any]:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs, text_offset (from `start`)."""
    tokens = [piece(t)[0] for t in ids]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=start)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": [None if s is None else {piece(i)[0]: v for i, v in s.top} for s in scores],
            "text_offset": offsets}


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("GET", "/v1/models"): models,
    ("POST", "/v1/chat/completions"): chat,
    ("POST", "/v1/completions"): complete,
}
