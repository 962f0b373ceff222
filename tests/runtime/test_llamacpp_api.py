"""llama.cpp server's /health, /tokenize and /detokenize on `qvl serve` (llamacpp_api.py), against
the model's own tokenizer; its paths without /v1, and its own /embedding and /embeddings."""

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


def test_paths_without_v1_are_the_v1_ones(running):
    """llama.cpp server's paths for clients whose base URL lacks /v1: the same replies."""
    assert running.json("/v1/health") == {"status": "ok"}
    assert running.json("/models") == running.json("/v1/models")
    chat = {"model": "tiny:1", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi there"}]}
    a, b = running.json("/chat/completions", chat), running.json("/v1/chat/completions", chat)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]  # the second read from the cache
    counted = running.json("/chat/completions/input_tokens", chat)
    assert counted == {"object": "response.input_tokens", "input_tokens": b["usage"]["prompt_tokens"]}
    assert running.json("/v1/chat/completions/input_tokens", chat) == counted
    asked = {"model": "tiny:1", "input": "Hi there", "max_output_tokens": 5}
    answers = [running.json(path, asked)["output"][0]["content"] for path in ("/responses", "/v1/responses")]
    assert answers[0] == answers[1]
    assert running.json("/responses/input_tokens", asked) == running.json("/v1/responses/input_tokens", asked)


def test_llamacpp_embeddings(running):
    """/embedding and /embeddings: llama.cpp's [{"index", "embedding": [[...]]}], normalized as
    embd_normalize says (2: Euclidean, as /v1/embeddings; -1: as it is, as /api/embeddings; 0:
    the largest |value| 32760; 1 and p > 2: the p-norm 1), within float32 rounding (1e-6)."""
    import numpy as np

    texts = ["a red fox", "a story"]
    unit = [d["embedding"] for d in running.json("/v1/embeddings", {"model": "tiny:1", "input": texts})["data"]]
    got = running.json("/embedding", {"content": texts})
    assert [g["index"] for g in got] == [0, 1] and all(len(g["embedding"]) == 1 for g in got)
    assert np.allclose([g["embedding"][0] for g in got], unit, atol=1e-6)
    raw = running.json("/api/embeddings", {"model": "tiny:1", "prompt": texts[0]})["embedding"]
    one = running.json("/embeddings", {"input": texts[0], "embd_normalize": -1})
    assert len(one) == 1 and np.allclose(one[0]["embedding"][0], raw, atol=1e-6)
    x = np.asarray(raw, dtype=np.float64)
    for kind, norm in ((0, np.abs(x).max() / 32760), (1, np.abs(x).sum()), (3, (np.abs(x) ** 3).sum() ** (1 / 3))):
        v = running.json("/embedding", {"content": texts[0], "embd_normalize": kind})[0]["embedding"][0]
        assert np.allclose(v, x / norm, rtol=1e-5, atol=1e-6 * np.abs(x / norm).max()), kind
    for body, says in (({}, '"input" or "content" must be provided'), ({"content": []}, "content: a text or"),
                       ({"content": "x", "embd_normalize": -2}, "embd_normalize -2: -1 (none)")):
        status, data = running.request("/embedding", body)
        assert status == 400 and says in json.loads(data)["error"], data
