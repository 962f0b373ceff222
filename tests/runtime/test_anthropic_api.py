"""POST /v1/messages (Anthropic's Messages API, as Ollama and llama.cpp's server answer it):
the answer /v1/chat/completions gives for the same conversation, Anthropic's reply and stream
shapes, stop reasons, and what it refuses."""

from __future__ import annotations

import base64
import json

import pytest
from serving import png


def _ask(running, **body):
    return running.json("/v1/messages", {"model": "tiny:1", "max_tokens": 5, **body})


def test_the_answer_chat_completions_gives(running):
    data = base64.b64encode(png()).decode()
    got = _ask(running, system="Be brief.", messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What colour?"}]}])
    want = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 5, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
            {"type": "text", "text": "What colour?"}]}]})
    assert got["type"] == "message" and got["role"] == "assistant" and got["id"].startswith("msg_")
    assert got["content"] == [{"type": "text", "text": want["choices"][0]["message"]["content"]}]
    assert got["stop_reason"] == "max_tokens" and got["stop_sequence"] is None
    usage = got["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == want["usage"]["prompt_tokens"]
    assert usage["output_tokens"] == 5


def test_a_stop_sequence(running):
    text = _ask(running, max_tokens=8, messages=[{"role": "user", "content": "Count."}])["content"][0]["text"]
    cut = next(i for i in range(1, len(text)) if text[i:i + 2].strip() and text[:i].strip())
    got = _ask(running, max_tokens=8, stop_sequences=[text[cut:cut + 2]], messages=[{"role": "user", "content": "Count."}])
    assert got["stop_reason"] == "stop_sequence" and got["stop_sequence"] == text[cut:cut + 2]
    assert got["content"][0]["text"] == text[:text.index(text[cut:cut + 2])]


def test_the_stream_is_anthropics_named_events(running):
    body = {"model": "tiny:1", "max_tokens": 6, "messages": [{"role": "user", "content": "Hi"}]}
    whole = running.json("/v1/messages", body)
    status, data = running.request("/v1/messages", {**body, "stream": True})
    assert status == 200 and b"[DONE]" not in data
    events = []
    for block in data.decode().strip().split("\n\n"):
        name, line = block.split("\n")
        events.append((name[len("event: "):], json.loads(line[len("data: "):])))
    assert all(name == e["type"] for name, e in events)
    names = [n for n, _ in events]
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * deltas + [
        "content_block_stop", "message_delta", "message_stop"]
    assert "".join(e["delta"]["text"] for n, e in events if n == "content_block_delta") == whole["content"][0]["text"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens" and events[-2][1]["usage"]["output_tokens"] == 6


def test_count_tokens_is_what_messages_reads(running):
    """/v1/messages/count_tokens: the input tokens (KV-cache reads included) /v1/messages reports
    for the same body; a picture's (56x84: 2x3 merged patches and its start / end) counted."""
    data = base64.b64encode(png()).decode()
    text = [{"role": "user", "content": "What colour?"}]
    picture = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        {"type": "text", "text": "What colour?"}]}]
    counts = []
    for messages in (text, picture):
        body = {"model": "tiny:1", "system": [{"type": "text", "text": "Be brief."}], "messages": messages}
        counts.append(running.json("/v1/messages/count_tokens", body)["input_tokens"])
        usage = _ask(running, max_tokens=1, **body)["usage"]
        assert counts[-1] == usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert counts[1] - counts[0] == 6 + 2
    status, data = running.request("/v1/messages/count_tokens", {"model": "tiny:1", "messages": text,
                                                                 "tools": [{"name": "f"}]})
    assert status == 400 and "does not support tools" in json.loads(data)["error"]


@pytest.mark.parametrize("body,expect", [
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": None}, "max_tokens: required"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}, "does not support tools"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 1024}},
     "does not support thinking"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source: of type base64 or url"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "a block of type text or image"),
    ({"messages": [{"role": "user", "content": "x"}], "system": 3}, "system: a string or a list of text blocks"),
    ({"messages": [{"role": "user", "content": "x"}], "stop_sequences": "x"}, "stop_sequences: a list of strings"),
    ({"messages": []}, "messages: a non-empty list"),
])
def test_refused(running, body, expect):
    status, data = running.request("/v1/messages", {"model": "tiny:1", "max_tokens": 5, **body})
    assert status == 400 and expect in json.loads(data)["error"], data
