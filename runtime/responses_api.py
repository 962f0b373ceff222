"""`qvl serve`'s POST /v1/responses: OpenAI's Responses API, stateless, as Ollama serves it.

`input` is a string (one user message) or a list of messages (`role` user, assistant, system or
developer; `content` a string or parts: `input_text`, `input_image` with a data: URL,
`output_text` in an assistant's); `instructions` is the system message. Read as well:
`max_output_tokens`, `temperature`, `top_p`, `seed`, `stop`, `presence_penalty` /
`frequency_penalty`, `text.format` (`json_object`, or `json_schema` with its `schema`) and
`stream`. The reply is a response object whose one output item is the assistant's message,
`usage.input_tokens_details.cached_tokens` the prompt tokens the KV cache already held; a stream
is the named server-sent events OpenAI's SDKs read (`response.created` ...
`response.output_text.delta` ... `response.completed`, which carries llama-server's `timings`; its
`timings_per_token` puts the timings so far on each delta, its `return_progress` sends
`response.in_progress` events with `prompt_progress` as the prompt is read). previous_response_id, conversation,
tools and background are refused (400), not ignored. POST /v1/responses/input_tokens counts the
input tokens of the same body (OpenAI's `responses.input_tokens.count`), pictures' included."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from .generation import llama_timings
from .live import PromptProgress, asks_progress
from .openai_api import _options
from .media_fetch import MediaAccess
from .request_messages import request_messages
from .server import Loaded, Reply, RequestError, Service, answer_format, unsupported

_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "input_image": "image_url"}


def _part(part: Any, where: str) -> dict[str, Any]:
    """A Responses content part as the chat API's (request_messages reads those)."""
    kind = _PARTS.get(part.get("type")) if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": part.get("text")}
    if kind == "image_url":
        url = part.get("image_url")
        return {"type": "image_url", "image_url": {"url": url.get("url") if isinstance(url, dict) else url}}
    raise RequestError(400, f"{where}: a part of type input_text, input_image or output_text")


def chat_messages(body: dict[str, Any], access: MediaAccess) -> list[dict[str, Any]]:
    """`instructions` and `input` as the chat API's messages, in transformers' format; pictures by
    URL as `access` allows."""
    given = body.get("input")
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise RequestError(400, "input: a string or a non-empty list of messages")
    raw: list[Any] = []
    for i, item in enumerate(given):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else None
            raise RequestError(400, f"input[{i}]: a message (role and content){f', not {kind}' if kind else ''}")
        content = item.get("content")
        if isinstance(content, list):
            content = [_part(p, f"input[{i}].content[{j}]") for j, p in enumerate(content)]
        raw.append({"role": "system" if item.get("role") == "developer" else item.get("role"), "content": content})
    messages = request_messages(raw, None, access, "input")
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError(400, "instructions: a string")
        messages.insert(0, {"role": "system", "content": instructions})
    return messages


def _format_body(body: dict[str, Any]) -> dict[str, Any]:
    """`text.format` as the chat API's response_format (answer_format reads that)."""
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}}}
    raise RequestError(400, 'text.format: {"type": "text"}, {"type": "json_object"} or '
                            '{"type": "json_schema", "name": ..., "schema": {...}}')


def _conversation(service: Service, loaded: Loaded, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's messages, the stored system message first where it has none; state and tools refused."""
    for key in ("previous_response_id", "conversation", "background"):
        if body.get(key):
            raise RequestError(400, f"{key}: qvl serve's responses are stateless (as Ollama's)")
    unsupported({"tools": body.get("tools")}, service._name(loaded))
    return loaded.with_system(chat_messages(body, service.config.media))


def input_tokens(service: Service, body: dict[str, Any]) -> Reply:
    """POST /v1/responses/input_tokens: the input tokens /v1/responses would read for the same body."""
    loaded = service.use(body.get("model"))
    count = loaded.model.count_chat_tokens(_conversation(service, loaded, body))
    return Reply({"object": "response.input_tokens", "input_tokens": count})


def respond(service: Service, body: dict[str, Any]) -> Reply:
    loaded = service.use(body.get("model"))
    messages = _conversation(service, loaded, body)
    kwargs = _options(loaded, service, {**body, "max_tokens": body.get("max_output_tokens")}, None)
    form = answer_format(_format_body(body))
    n = next(service._ids)
    head = {"id": f"resp_{n}", "object": "response", "created_at": int(time.time()), "model": service._name(loaded),
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "tools": [], "tool_choice": "none",
            "parallel_tool_calls": False, "text": body.get("text") or {"format": {"type": "text"}},
            "metadata": body.get("metadata") or {}, "error": None}
    message_id = f"msg_{n}"
    streaming = bool(body.get("stream", False))
    pieces = loaded.model.chat(messages, stream=True, format=form, progress=asks_progress(body), **kwargs)

    def message(text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def finished(text: str) -> dict[str, Any]:
        g = loaded.model.last_generation
        assert g is not None
        status = "completed" if g.ended else "incomplete"
        return {**head, "status": status,
                "incomplete_details": None if g.ended else {"reason": "max_output_tokens"},
                "output": [message(text, status)],
                "usage": {"input_tokens": g.prompt_tokens, "output_tokens": len(g.token_ids),
                          "total_tokens": g.prompt_tokens + len(g.token_ids),
                          "input_tokens_details": {"cached_tokens": g.reused_tokens},
                          "output_tokens_details": {"reasoning_tokens": 0}}}

    if not streaming:
        return Reply(finished("".join(pieces)))

    def timings(final: bool) -> dict[str, Any]:  # llama-server's, on the last event and with timings_per_token
        g = loaded.model.last_generation
        if final and g is not None:
            return {"timings": llama_timings(g)}
        return {"timings": loaded.model.live.timings()} if body.get("timings_per_token") else {}

    return Reply(events=_events(head, message, pieces, finished, timings), sse=True, named_events=True,
                 sse_done=False)


def _events(head: dict[str, Any], message: Callable[[str, str], dict[str, Any]], pieces: Iterator[Any],
            finished: Callable[[str], dict[str, Any]],
            timings: Callable[[bool], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The stream of a response: its events, numbered, each with its `type` (the SSE event name);
    `timings(final)`: the llama-server timings an event carries."""
    count = iter(range(1 << 62))
    at = {"output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": f"response.{kind}", "sequence_number": next(count), **fields}

    start = {**head, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
    yield event("created", response=start)
    yield event("in_progress", response=start)
    item_id = message("", "in_progress")["id"]
    empty = {"type": "output_text", "text": "", "annotations": []}

    def opened() -> Iterator[dict[str, Any]]:  # the message's item and part, at its first text (llama-server's)
        yield event("output_item.added", output_index=0, item=message("", "in_progress") | {"content": []})
        yield event("content_part.added", item_id=item_id, **at, part=empty)

    text: list[str] = []
    for piece in pieces:
        if isinstance(piece, PromptProgress):  # before the message's item, as llama-server's
            yield event("in_progress", response=start, prompt_progress=piece.to_json(), **timings(False))
            continue
        if not text:
            yield from opened()
        text.append(piece)
        yield event("output_text.delta", item_id=item_id, **at, delta=piece, logprobs=[], **timings(False))
    if not text:  # no text: the item and part still opened before they are done
        yield from opened()
    whole = "".join(text)
    done = finished(whole)
    yield event("output_text.done", item_id=item_id, **at, text=whole, logprobs=[])
    yield event("content_part.done", item_id=item_id, **at, part={**empty, "text": whole})
    yield event("output_item.done", output_index=0, item=done["output"][0])
    yield event("completed" if done["status"] == "completed" else "incomplete", response=done, **timings(True))


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("POST", "/v1/responses"): respond,
    ("POST", "/v1/responses/input_tokens"): input_tokens,
    ("POST", "/responses"): respond,  # llama.cpp server's paths without /v1
    ("POST", "/responses/input_tokens"): input_tokens,
}
