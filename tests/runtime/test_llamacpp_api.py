"""llama.cpp server's /health, /tokenize and /detokenize on `qvl serve` (llamacpp_api.py), against
the model's own tokenizer."""

from __future__ import annotations

import json

import pytest


def test_health(running):
    assert running.json("/health") == {"status": "ok"}


def test_tokenize_and_detokenize(running, reference):
    text = "<|im_start|>user\nHello, 𝔘 world<|im_end|>"
    want = reference.tokenizer.encode(text, add_special_tokens=False).ids
    assert want[0] == reference.tokenizer.token_to_id("<|im_start|>")  # the special token read as one
    assert running.json("/tokenize", {"content": text})["tokens"] == want
    assert running.json("/tokenize", {"content": text, "model": "tiny:1", "add_special": True})["tokens"] == want
    pieces = running.json("/tokenize", {"content": text, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == want
    split = [p["piece"] for p in pieces if isinstance(p["piece"], list)]
    assert split  # 𝔘's four bytes are not one token: its parts are given as bytes
    joined = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces)
    assert joined.decode() == text
    assert running.json("/detokenize", {"tokens": want}) == {"content": text}
    assert running.json("/tokenize", {"content": ""}) == {"tokens": []}


@pytest.mark.parametrize("path, body, says", [
    ("/tokenize", {}, "content: a string"),
    ("/tokenize", {"content": "a", "with_pieces": "yes"}, "with_pieces: true or false"),
    ("/tokenize", {"content": "a", "parse_special": False}, "parse_special false: not supported"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens: a list of token ids below"),
    ("/detokenize", {"tokens": "1 2"}, "tokens: a list of token ids below"),
    ("/tokenize", {"content": "a", "model": "nosuch:1"}, "model 'nosuch:1' not found"),
])
def test_bad_requests(running, path, body, says):
    status, data = running.request(path, body)
    assert status in (400, 404) and says in json.loads(data)["error"]


def test_apply_template_then_completion_answers_as_chat_completions(running, tmp_path):
    """/apply-template's prompt (each picture a <__media__> marker), sent to /completion with the
    picture, gives the answer and prompt tokens /v1/chat/completions gives for the messages."""
    import base64

    from serving import png
    from videos import make_video

    data = base64.b64encode(png()).decode()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
        {"type": "text", "text": "What colour?"}]}]
    prompt = running.json("/apply-template", {"model": "tiny:1", "messages": messages})["prompt"]
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<__media__>What colour?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    got = running.json("/completion", {"model": "tiny:1", "n_predict": 5,
                                       "prompt": {"prompt_string": prompt, "multimodal_data": [data]}})
    want = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 5, "messages": messages})
    assert got["content"] == want["choices"][0]["message"]["content"]
    assert got["tokens_evaluated"] == want["usage"]["prompt_tokens"]
    video = base64.b64encode(make_video(tmp_path / "v.mp4", frames=4, fps=2, size=(56, 56)).read_bytes()).decode()
    status, data = running.request("/apply-template", {"model": "tiny:1", "messages": [
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + video}}]}]})
    assert status == 400 and "takes pictures only" in json.loads(data)["error"], data
