"""`qvl serve`'s embeddings (embed_api.py): Ollama's /api/embed and /api/embeddings, OpenAI's
/v1/embeddings, against the tiny model's own final-norm hidden states (which its output layer
turns into the logits that test_model.py checks against transformers)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from qvl.runtime import embed_api


def last_hidden(model, text: str, cut: int | None = None) -> np.ndarray:
    ids = model.tokenize(text, [])[0][:cut]
    return torch.cat(model.token_hidden(ids))[-1].float().numpy()


def test_the_hidden_state_is_the_one_the_logits_come_from(reference):
    text = "The cat sat on the mat"
    hidden = torch.cat(reference.token_hidden(reference.tokenize(text, [])[0]))
    want = reference.prompt_logits(text, template=False)
    assert torch.allclose(reference.decoder.logits(hidden), want, atol=1e-5, rtol=0)


def test_ollama_embed(running, reference):
    texts = ["The cat sat on the mat", "A dog"]
    got = running.json("/api/embed", {"model": "tiny:1", "input": texts})
    assert got["model"] == "tiny:1" and len(got["embeddings"]) == 2
    assert got["prompt_eval_count"] == sum(len(reference.tokenize(t, [])[0]) for t in texts)
    for vector, text in zip(got["embeddings"], texts):
        want = last_hidden(reference, text)
        assert np.allclose(vector, want / np.linalg.norm(want), atol=1e-6)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
    one = running.json("/api/embed", {"model": "tiny:1", "input": texts[0]})["embeddings"]
    assert one == got["embeddings"][:1]
    assert running.json("/api/embed", {"model": "tiny:1", "input": ""})["embeddings"] == []
    # dimensions: the first N values, normalized again
    short = running.json("/api/embed", {"model": "tiny:1", "input": texts[0], "dimensions": 5})["embeddings"][0]
    want = last_hidden(reference, texts[0])[:5]
    assert np.allclose(short, want / np.linalg.norm(want), atol=1e-6)
    # longer than num_ctx: cut to its first tokens, or refused with truncate false
    cut = running.json("/api/embed", {"model": "tiny:1", "input": texts[0], "options": {"num_ctx": 3}})
    want = last_hidden(reference, texts[0], 3)
    assert cut["prompt_eval_count"] == 3 and np.allclose(cut["embeddings"][0], want / np.linalg.norm(want), atol=1e-6)
    for body, expect in [({"input": texts[0], "truncate": False, "options": {"num_ctx": 3}},
                          "input: 6 tokens, more than the context (3"),
                         ({"input": texts[0], "dimensions": 0}, "dimensions 0: 1 to the model's"),
                         ({"input": ["a", ""]}, "input[1]: an empty text has no embedding"),
                         ({"input": 7}, "input: a text or a list of texts")]:
        status, data = running.request("/api/embed", {"model": "tiny:1", **body})
        assert status == 400 and expect in json.loads(data)["error"], data
    old = running.json("/api/embeddings", {"model": "tiny:1", "prompt": texts[1]})["embedding"]
    assert np.allclose(old, last_hidden(reference, texts[1]), atol=1e-6)  # the older endpoint: not normalized


def test_openai_embeddings(running, reference):
    text = "The cat sat on the mat"
    ids = reference.tokenize(text, [])[0]
    got = running.json("/v1/embeddings", {"model": "tiny:1", "input": [text, ids]})
    assert got["object"] == "list" and [d["index"] for d in got["data"]] == [0, 1]
    assert got["data"][0]["embedding"] == got["data"][1]["embedding"]  # token ids are read as they are
    assert got["usage"] == {"prompt_tokens": 2 * len(ids), "total_tokens": 2 * len(ids)}
    packed = running.json("/v1/embeddings", {"model": "tiny:1", "input": text, "encoding_format": "base64"})
    values = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(values, got["data"][0]["embedding"], atol=1e-7)
    for body, expect in [({"input": []}, "input: a text or a list of texts"),
                         ({"input": [[1, 10**9]]}, "input: a text (or a list of token ids below"),
                         ({"input": "x", "encoding_format": "int8"}, "encoding_format 'int8': float or base64")]:
        status, data = running.request("/v1/embeddings", {"model": "tiny:1", **body})
        assert status == 400 and expect in json.loads(data)["error"], data


def test_packs():
    assert embed_api.packs([5, 3, 4, 20, 1, 12], 12) == [[0, 1, 2], [3], [4], [5]]
    assert embed_api.packs([1] * 5, 2) == [[0, 1], [2, 3], [4]] and embed_api.packs([], 4) == []


def test_texts_side_by_side_are_read_as_alone(reference, monkeypatch):
    """Texts packed into one pass, each attending to itself from position 0, give the hidden
    states each gives alone; a text longer than a pack is read alone. Tolerance 1e-5 of the
    largest |value|: the same float32 sums over rows of a taller matrix (the attention masked
    rather than cut); measured 0 here."""
    texts = ["The cat sat on the mat", "A dog", "x", "Some longer text that goes on for a while, past a pack", "Ok"]
    ids = [reference.tokenize(t, [])[0] for t in texts]
    monkeypatch.setattr(embed_api, "PACK_TOKENS", 12)
    assert embed_api.packs([len(i) for i in ids], 12) == [[0, 1, 2], [3], [4]]
    got = embed_api.embeddings_of(reference, ids)
    for vector, one in zip(got, ids):
        want = torch.cat(reference.token_hidden(one))[-1].float().numpy()
        assert np.abs(vector - want).max() <= 1e-5 * np.abs(want).max()
    swapped = embed_api.embeddings_of(reference, [ids[1], ids[0]])  # a text's place in a pack does not matter
    assert np.abs(swapped[1] - got[0]).max() <= 1e-5 * np.abs(got[0]).max()
