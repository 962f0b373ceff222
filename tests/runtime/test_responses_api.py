"""POST /v1/responses (OpenAI's Responses API, stateless, as Ollama serves it) answered as
/v1/chat/completions answers the same conversation; its stream's named events; its errors; and
GET /v1/models/NAME."""

from __future__ import annotations

import base64
import json

import pytest
from serving import png

from qvl.runtime.lora import Adapters


def _chat(running, messages, max_tokens, **extra):
    got = running.json("/v1/chat/completions", {"model": "tiny:1", "messages": messages, "max_tokens": max_tokens,
                                                 **extra})
    return got["choices"][0], got["usage"]


def _text(response) -> str:
    [item] = response["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    return "".join(p["text"] for p in item["content"] if p["type"] == "output_text")


def test_a_string_input_is_one_user_message(running):
    got = running.json("/v1/responses", {"model": "tiny:1", "input": "Hi", "max_output_tokens": 5})
    choice, usage = _chat(running, [{"role": "user", "content": "Hi"}], 5)
    assert got["object"] == "response" and got["id"].startswith("resp_") and got["model"] == "tiny:1"
    assert _text(got) == choice["message"]["content"]
    assert got["status"] == "incomplete" and got["incomplete_details"] == {"reason": "max_output_tokens"}
    assert got["output"][0]["status"] == "incomplete"
    assert got["usage"]["input_tokens"] == usage["prompt_tokens"] and got["usage"]["output_tokens"] == 5
    assert got["usage"]["total_tokens"] == usage["prompt_tokens"] + 5


def test_instructions_developer_and_picture_parts(running):
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    got = running.json("/v1/responses", {
        "model": "tiny:1", "instructions": "Answer briefly.", "max_output_tokens": 4,
        "input": [{"role": "developer", "content": "Use plain words."},
                  {"type": "message", "role": "user", "content": [
                      {"type": "input_image", "image_url": url}, {"type": "input_text", "text": "What colour?"}]},
                  {"role": "assistant", "content": [{"type": "output_text", "text": "Red."}]},
                  {"role": "user", "content": "Sure?"}]})
    choice, usage = _chat(running, [
        {"role": "system", "content": "Answer briefly."}, {"role": "system", "content": "Use plain words."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Sure?"}], 4)
    assert _text(got) == choice["message"]["content"]
    assert got["usage"]["input_tokens"] == usage["prompt_tokens"] > 20  # the picture's tokens are in
    assert got["instructions"] == "Answer briefly."


def test_input_tokens_counts_what_responses_reads(running):
    """/v1/responses/input_tokens (openai-python's responses.input_tokens.count): the usage's
    input_tokens of the same body, the picture's included; state and tools refused as there."""
    url = "data:image/png;base64," + base64.b64encode(png()).decode()
    body = {"model": "tiny:1", "instructions": "Answer briefly.", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url}, {"type": "input_text", "text": "What colour?"}]}]}
    got = running.json("/v1/responses/input_tokens", body)
    assert got["object"] == "response.input_tokens"
    assert got["input_tokens"] == running.json("/v1/responses", {**body, "max_output_tokens": 1})["usage"]["input_tokens"]
    text = running.json("/v1/responses/input_tokens", {"model": "tiny:1", "instructions": "Answer briefly.",
                                                        "input": [{"role": "user", "content": "What colour?"}]})
    assert got["input_tokens"] - text["input_tokens"] == 6 + 2  # 56x84: 2x3 merged patches, start and end
    for extra, expect in (({"previous_response_id": "resp_1"}, "stateless"), ({"tools": [{"name": "f"}]}, "tools")):
        status, data = running.request("/v1/responses/input_tokens", {**body, **extra})
        assert status == 400 and expect in json.loads(data)["error"], data


def test_cached_tokens_are_the_prompt_the_cache_held(running):
    body = {"model": "tiny:1", "input": "Count to three, slowly.", "max_output_tokens": 3}
    running.json("/v1/responses", body)
    again = running.json("/v1/responses", body)
    assert 0 < again["usage"]["input_tokens_details"]["cached_tokens"] < again["usage"]["input_tokens"]


def test_a_json_schema_text_format(running):
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}
    got = running.json("/v1/responses", {"model": "tiny:1", "input": "Pick.", "max_output_tokens": 24,
                                         "text": {"format": {"type": "json_schema", "name": "pick", "schema": schema}}})
    assert got["status"] == "completed" and json.loads(_text(got))["a"] in ("x", "y")
    assert got["text"]["format"]["name"] == "pick"


def _events(data: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in data.decode().strip().split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        out.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return out


def test_the_stream_is_named_events(running):
    body = {"model": "tiny:1", "input": "Hi", "max_output_tokens": 6}
    whole = running.json("/v1/responses", body)
    status, data = running.request("/v1/responses", {**body, "stream": True})
    assert status == 200 and b"[DONE]" not in data
    events = _events(data)
    assert all(name == e["type"] for name, e in events)
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    names = [name for name, _ in events]
    deltas = names.count("response.output_text.delta")
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * deltas + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete"]
    text = "".join(e["delta"] for name, e in events if name == "response.output_text.delta")
    assert text == _text(whole) == events[-4][1]["text"] and deltas >= 1
    final = events[-1][1]["response"]
    assert _text(final) == text and final["usage"]["output_tokens"] == 6 and final["status"] == "incomplete"
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    assert {e["item_id"] for name, e in events if "item_id" in e} == {final["output"][0]["id"]}


@pytest.mark.parametrize("extra,expect", [
    ({"input": []}, "input: a string or a non-empty list of messages"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]: a message (role and content), not function_call"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0]: an object with role system, user or assistant"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "input[0].content[0]: a part of type input_text, input_image or output_text"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"},
                                             {"type": "input_image", "image_url": "data:image/png;base64,@@"}]}]},
     "input[0].content[1]: not base64"),
    ({"instructions": 3}, "instructions: a string"),
    ({"previous_response_id": "resp_1"}, "previous_response_id: qvl serve's responses are stateless"),
    ({"text": {"format": {"type": "xml"}}}, "text.format:"),
    ({"tools": [{"type": "function", "name": "f"}]}, "does not support tools"),
])
def test_errors(running, extra, expect):
    status, data = running.request("/v1/responses", {"model": "tiny:1", "input": "x", **extra})
    assert status == 400 and expect in json.loads(data)["error"], data


def test_one_model_by_name(running):
    listed = running.json("/v1/models")["data"]
    one = next(m for m in listed if m["id"].startswith("tiny:1") or m["id"].endswith("tiny:1"))
    assert running.json(f"/v1/models/{one['id']}") == one
    assert running.json("/v1/models/tiny%3A1") == one
    status, data = running.request("/v1/models/nope:9")
    assert status == 404 and "not found" in json.loads(data)["error"]


class Failing:
    """A model that says "a", then fails."""

    last_generation = None
    adapters = Adapters()  # no run-time LoRA adapters
    defaults: dict = {}

    def chat(self, messages, stream, **kwargs):
        def pieces():
            yield "a"
            from qvl.runtime.model import ModelError
            raise ModelError("the context is full")
        return pieces()


def test_an_error_inside_the_stream_is_a_named_error_event(store):
    from serving import Running

    from qvl.runtime.server import ServeConfig, Service

    running = Running(Service(ServeConfig(), store, loader=lambda name, **kw: Failing()))
    status, data = running.request("/v1/responses", {"model": "tiny:1", "input": "x", "stream": True})
    events = _events(data)
    assert events[4][1]["delta"] == "a"
    assert events[-1] == ("error", {"error": "the context is full"})
    running.server.shutdown()


def test_an_answer_of_no_text_still_opens_its_item_before_closing_it():
    from qvl.runtime.responses_api import _events

    def message(text, status):
        return {"type": "message", "id": "msg_1", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    done = {"status": "completed", "output": [message("", "completed")]}
    events = list(_events({"id": "resp_1"}, message, iter([]), lambda text: done, lambda final: {}))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(8))
