"""`qvl serve`'s POST /v1/messages: Anthropic's Messages API, as Ollama and llama.cpp's server
answer it (clients written for Anthropic's SDK, pointed at ANTHROPIC_BASE_URL).

Read: `messages` (user / assistant; content a string or blocks: `text`, `image` with a base64
`source`, or a `url` source fetched as OpenAI's image URLs are, media_fetch.py), `system` (a
string or text blocks), `max_tokens` (required, as Anthropic's), `temperature`, `top_p`, `top_k`,
`stop_sequences`, `stream`. Refused by name: tools, thinking. The reply is Anthropic's message object (content:
one text block; stop_reason end_turn, max_tokens or stop_sequence; usage with
cache_read_input_tokens: the prompt tokens the KV cache held); a stream is its named events
(message_start, content_block_start, ping, content_block_delta..., content_block_stop,
message_delta, message_stop). POST /v1/messages/count_tokens answers {"input_tokens": n} for
the same body (max_tokens not needed): the prompt's tokens, pictures' included, nothing run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .request_messages import request_messages
from .server import Loaded, Reply, RequestError, Service, generation_options, unsupported
from .tokenizer import stop_word


def _block(block: Any, where: str) -> dict[str, Any]:
    """An Anthropic content block as the chat API's part (request_messages reads those)."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return {"type": "text", "text": block.get("text")}
    if kind == "image":
        source = block.get("source")
        kind = source.get("type") if isinstance(source, dict) else None
        if kind not in ("base64", "url"):
            raise RequestError(400, f"{where}.source: of type base64 or url")
        return {"type": "image_url", "image_url": {"url": source.get("data" if kind == "base64" else "url")}}
    raise RequestError(400, f"{where}: a block of type text or image")


def _system(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in value):
        return "\n".join(str(b.get("text", "")) for b in value)
    raise RequestError(400, "system: a string or a list of text blocks")


def _conversation(service: Service, loaded: Loaded, body: dict[str, Any]) -> list[dict[str, Any]]:
    """`system` and `messages` as the chat API's messages (tools and thinking refused)."""
    thinking = body.get("thinking")
    unsupported({"tools": body.get("tools"), "think": isinstance(thinking, dict) and thinking.get("type") == "enabled"},
                service._name(loaded))
    raw = body.get("messages")
    if isinstance(raw, list):
        raw = [{**m, "content": [_block(b, f"messages[{i}].content[{j}]") for j, b in enumerate(m["content"])]}
               if isinstance(m, dict) and isinstance(m.get("content"), list) else m for i, m in enumerate(raw)]
    chat = request_messages(raw, None, service.config.media)
    system = _system(body.get("system"))
    if system is None:
        system = loaded.system
    if system is not None:
        chat.insert(0, {"role": "system", "content": system})
    return chat


def count_tokens(service: Service, body: dict[str, Any]) -> Reply:
    """POST /v1/messages/count_tokens: the input tokens /v1/messages would read for the same body."""
    loaded = service.use(body.get("model"))
    return Reply({"input_tokens": loaded.model.count_chat_tokens(_conversation(service, loaded, body))})


def messages(service: Service, body: dict[str, Any]) -> Reply:
    loaded = service.use(body.get("model"))
    limit = body.get("max_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise RequestError(400, "max_tokens: required, a whole number of tokens above 0")
    chat = _conversation(service, loaded, body)
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(400, "stop_sequences: a list of strings")
    options = {"num_predict": limit, "stop": stops,
               **{k: body[k] for k in ("temperature", "top_p", "top_k") if body.get(k) is not None}}
    kwargs = generation_options(loaded.params, options, service.config.ctx_size)
    model = loaded.model
    name, mid = service._name(loaded), f"msg_{next(service._ids)}"
    pieces = model.chat(chat, stream=True, **kwargs)

    def ending(text: str) -> dict[str, Any]:
        g = model.last_generation
        assert g is not None
        word = stop_word(model.tokenizer.decode(g.token_ids, skip_special_tokens=True), text,
                         list(kwargs.get("stop") or [])) if g.ended else None
        return {"stop_reason": "stop_sequence" if word is not None else "end_turn" if g.ended else "max_tokens",
                "stop_sequence": word,
                "usage": {"input_tokens": g.prompt_tokens - g.reused_tokens, "output_tokens": len(g.token_ids),
                          "cache_read_input_tokens": g.reused_tokens, "cache_creation_input_tokens": 0}}

    head = {"id": mid, "type": "message", "role": "assistant", "model": name}
    if not body.get("stream", False):
        text = "".join(pieces)
        return Reply({**head, "content": [{"type": "text", "text": text}], **ending(text)})
    return Reply(events=_events(head, pieces, ending), sse=True, named_events=True, sse_done=False)


def _events(head: dict[str, Any], pieces: Iterator[str],
            ending: Callable[[str], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield {"type": "message_start", "message": {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                                                "usage": {"input_tokens": 0, "output_tokens": 0}}}
    yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    yield {"type": "ping"}
    said = []
    for piece in pieces:
        said.append(piece)
        yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
    end = ending("".join(said))
    yield {"type": "content_block_stop", "index": 0}
    yield {"type": "message_delta", "delta": {"stop_reason": end["stop_reason"], "stop_sequence": end["stop_sequence"]},
           "usage": end["usage"]}
    yield {"type": "message_stop"}


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("POST", "/v1/messages"): messages,
    ("POST", "/v1/messages/count_tokens"): count_tokens,
}
