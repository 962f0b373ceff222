"""POST /completion, llama.cpp server's own endpoint: answered as /v1/completions answers the
same prompt (the prompt continued as it is), with llama.cpp's reply fields, its stream, its
multimodal prompt object, its logit_bias forms and stop types; what it cannot do refused."""

from __future__ import annotations

import base64
import json

import pytest
from serving import png


def _done(running, body):
    return running.json("/completion", {"model": "tiny:1", **body})


def test_a_string_prompt_is_continued_as_v1_completions_does(running):
    got = _done(running, {"prompt": "The sky is", "n_predict": 6, "return_tokens": True})
    want = running.json("/v1/completions", {"model": "tiny:1", "prompt": "The sky is", "max_tokens": 6})
    assert got["content"] == want["choices"][0]["text"] and got["stop"] is True
    assert got["tokens_predicted"] == 6 == len(got["tokens"]) and got["stop_type"] == "limit"
    assert got["tokens_evaluated"] == want["usage"]["prompt_tokens"]
    t = got["timings"]
    assert t["predicted_n"] == 6 and t["predicted_ms"] > 0 and t["predicted_per_second"] > 0
    assert t["prompt_n"] == got["tokens_evaluated"] - got["tokens_cached"]
    assert got["generation_settings"]["n_predict"] == 6 and got["model"] == "tiny:1"
    assert got["generation_settings"]["speculative.types"] == "none"  # no --spec-type


def test_stream_chunks_then_the_whole_reply(running):
    body = {"prompt": "The sky is", "n_predict": 5}
    whole = _done(running, body)
    status, data = running.request("/completion", {"model": "tiny:1", **body, "stream": True})
    assert status == 200 and b"[DONE]" not in data
    events = [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")]
    assert all(not e["stop"] for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events[:-1]) == whole["content"] and events[-1]["content"] == ""
    assert events[-1]["tokens_predicted"] == 5 and events[-1]["stop_type"] == "limit"


def test_stream_chunks_carry_their_tokens_and_the_counts(running):
    """As llama-server's chunks: each its own tokens' ids (together the answer's, as return_tokens
    gives them), the tokens made so far and the prompt's."""
    body = {"prompt": "Count to ten:", "n_predict": 7}
    whole = _done(running, {**body, "return_tokens": True})
    status, data = running.request("/completion", {"model": "tiny:1", **body, "stream": True})
    events = [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")]
    chunks = events[:-1]
    assert [t for e in chunks for t in e["tokens"]] == whole["tokens"] and len(whole["tokens"]) == 7
    counts = [e["tokens_predicted"] for e in chunks]
    assert counts == sorted(counts) and counts[-1] == 7
    assert all(e["tokens_predicted"] == sum(len(c["tokens"]) for c in chunks[:i + 1]) for i, e in enumerate(chunks))
    assert all(e["tokens_evaluated"] == whole["tokens_evaluated"] > 0 for e in chunks)


def test_a_stop_word_and_an_end_of_turn(running):
    free = _done(running, {"prompt": "Count:", "n_predict": 8, "return_tokens": True})
    text = free["content"]
    cut = next(i for i in range(1, len(text)) if text[i:i + 2].strip() and text[:i].strip())
    word = text[cut:cut + 2]
    got = _done(running, {"prompt": "Count:", "n_predict": 8, "stop": [word]})
    assert got["stop_type"] == "word" and got["stopping_word"] == word and got["content"] == text[:text.index(word)]
    first = free["tokens"][0]  # that token banned by llama.cpp's logit_bias forms: the answer changes
    for bias in ([[first, False]], {str(first): -1e9}):
        assert _done(running, {"prompt": "Count:", "n_predict": 2, "logit_bias": bias, "return_tokens": True}
                     )["tokens"][0] != first
    ended = _done(running, {"prompt": "Hi", "n_predict": 8, "grammar": 'root ::= "ok"'})
    assert ended["content"] == "ok" and ended["stop_type"] == "eos"


def test_a_picture_in_llama_cpps_multimodal_prompt(running, reference):
    prompt = "<|im_start|>user\n<__media__>What colour?<|im_end|>\n<|im_start|>assistant\n"
    data = png()
    got = _done(running, {"prompt": {"prompt_string": prompt, "multimodal_data": [base64.b64encode(data).decode()]},
                          "n_predict": 4})
    from io import BytesIO

    from PIL import Image

    picture = Image.open(BytesIO(data)).convert("RGB")
    want = reference.generate(prompt.replace("<__media__>", "<|vision_start|><|image_pad|><|vision_end|>"),
                              [picture], template=False, max_new_tokens=4)
    assert got["content"] == want.text and got["tokens_evaluated"] == want.prompt_tokens
    assert want.image_sizes == [(84, 56)]  # the picture went in: 6 of the prompt's tokens


def test_n_probs_gives_completion_probabilities(running):
    got = _done(running, {"prompt": "The sky is", "n_predict": 3, "n_probs": 2, "return_tokens": True})
    probs = got["completion_probabilities"]
    assert [p["id"] for p in probs] == got["tokens"]
    assert all(len(p["top_logprobs"]) == 2 and p["logprob"] <= 0 and isinstance(p["bytes"], list) for p in probs)
    assert all(p["top_logprobs"][0]["logprob"] >= p["top_logprobs"][1]["logprob"] for p in probs)


@pytest.mark.parametrize("extra,expect", [
    ({"prompt": [1, 2.5]}, "prompt[1]: a token id or a string"), ({"prompt": ["a", ["b"]]}, "prompt[1]: a string, tok"),
    ({"prompt": [1, 10**9]}, "a prompt of token ids: 1 or more of 0 to"), ({"prompt": [[]]}, "prompt[0]: a string, to"),
    ({"prompt": ["a", [1, 10**9]]}, "a prompt of token ids: 1 or more"), ({"prompt": []}, "a list of 1 to 256 prompts"),
    ({"prompt": ["a"] * 257}, "prompt: a list of 1 to 256 prompts"),
    ({"prompt": ["a", {"prompt_string": "<__media__>"}]}, "prompt[1]: 1 <__media__> markers for 0 pictures"),
    ({"prompt": {"prompt_string": "<__media__>", "multimodal_data": []}}, "1 <__media__> markers for 0 pictures"),
    ({"prompt": {"prompt_string": "x<__media__>", "multimodal_data": ["@@"]}}, "prompt.multimodal_data[0]: not base64"),
    ({"prompt": "x", "mirostat": 3}, "mirostat 3: 0 (off), 1 or 2"),
    ({"prompt": "x", "adaptive_decay": 1.5}, "adaptive_decay 1.5: between 0 and 0.99"),
    ({"prompt": "x", "n_indent": 2}, "n_indent 2: not done by qvl serve"),
    ({"prompt": "x", "samplers": ["top_k", "infill"]}, "samplers: infill is a sampler qvl does not have"),
    ({"prompt": "x", "samplers": "kq"}, "'q' is not a sampler's character"),
    ({"prompt": "x", "typical_p": "0.5"}, "typical_p '0.5': a number"),
    ({"prompt": "x", "xtc_probability": 3}, "xtc_probability 3: between 0 and 1"),
    ({"prompt": "x", "dry_sequence_breakers": []}, "dry_sequence_breakers: a non-empty list of texts"),
    ({"prompt": "x", "dry_penalty_last_n": -1}, "dry_penalty_last_n -1: a whole number, 0 or more"),
    ({"prompt": "x", "n_cmpl": 0}, "n_cmpl 0: 1 to 16 choices"), ({"prompt": "x", "n": 17}, "n 17: 1 to 16 choices"),
    ({"prompt": "x", "n_cmpl": True}, "n_cmpl True: 1 to 16 choices"),
    ({"prompt": "x", "n_probs": -1}, "n_probs -1: a whole number"),
    ({"prompt": "x", "response_fields": "content"}, "response_fields: a list of field names"),
    ({"prompt": "x", "logit_bias": [[1, "a"]]}, "the bias is a number or false"),
    ({"prompt": "x", "logit_bias": 3}, "logit_bias: [[token id or text"),
])
def test_refused(running, extra, expect):
    status, data = running.request("/completion", {"model": "tiny:1", **extra})
    assert status == 400 and expect in json.loads(data)["error"], data


def test_samplers_left_off_are_fine(running):
    got = _done(running, {"prompt": "Hi", "n_predict": 2, "mirostat": 0, "typical_p": 1.0, "dry_multiplier": 0.0,
                          "xtc_probability": 0, "seed": -1, "temperature": 0.7})
    assert got["tokens_predicted"] == 2


def test_the_sampler_chain_is_llama_cpps(running):
    """By default its order, temperature last, and its samplers' options, as generate gives them;
    `samplers` in names or characters; the settings in generation_settings and /props."""
    from qvl.runtime.sampler_chain import ORDER_LLAMACPP, ChainOptions

    model = running.service.use("tiny:1", None).model
    body = {"prompt": "Hi", "n_predict": 8, "temperature": 0.9, "top_p": 0.7, "typical_p": 0.95, "top_n_sigma": 2.5,
            "dynatemp_range": 0.3, "dry_multiplier": 0.7, "dry_base": 0.5, "dry_sequence_breakers": ["\n"], "seed": 4,
            "return_tokens": True}
    got = _done(running, body)
    want = model.generate("Hi", template=False, max_new_tokens=8, temperature=0.9, top_p=0.7, seed=4,
                          chain=ChainOptions(ORDER_LLAMACPP, typical_p=0.95, top_n_sigma=2.5, dynatemp_range=0.3,
                                             dry_multiplier=0.7, dry_sequence_breakers=("\n",)))
    assert got["tokens"] == want.token_ids
    settings = got["generation_settings"]
    assert settings["samplers"] == list(ORDER_LLAMACPP) and settings["typical_p"] == 0.95
    assert settings["xtc_probability"] == 0.0 and settings["xtc_threshold"] == 0.1
    assert settings["dry_base"] == 1.75 and settings["dry_sequence_breakers"] == ["\n"]  # a base below 1: its default
    # top_k 1 first leaves the likeliest token alone: the greedy answer at any temperature
    greedy = _done(running, {"prompt": "Hi", "n_predict": 8, "temperature": 0, "return_tokens": True})["tokens"]
    mirostat = {"prompt": "Hi", "n_predict": 8, "temperature": 0.8, "mirostat": 2, "mirostat_tau": 3.0,
                "mirostat_eta": 0.2, "seed": 6, "return_tokens": True}
    want = model.generate("Hi", template=False, max_new_tokens=8, temperature=0.8, seed=6,
                          chain=ChainOptions(ORDER_LLAMACPP, mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2))
    assert _done(running, mirostat)["tokens"] == want.token_ids
    adaptive = {"prompt": "Hi", "n_predict": 8, "temperature": 0.8, "samplers": ["top_k", "adaptive_p", "temperature"],
                "top_k": 20, "adaptive_target": 0.3, "adaptive_decay": 0.5, "seed": 6, "return_tokens": True}
    want = model.generate("Hi", template=False, max_new_tokens=8, temperature=0.8, top_k=20, seed=6,
                          chain=ChainOptions(("top_k", "adaptive_p", "temperature"), adaptive_target=0.3,
                                             adaptive_decay=0.5))
    assert _done(running, adaptive)["tokens"] == want.token_ids
    for order in (["top_k", "temperature"], "kt"):  # without dry or the penalties
        hot = _done(running, {"prompt": "Hi", "n_predict": 8, "temperature": 5.0, "top_k": 1, "samplers": order,
                              "return_tokens": True})
        assert hot["tokens"] == greedy and hot["generation_settings"]["samplers"] == ["top_k", "temperature"]
    params = running.json("/props")["default_generation_settings"]["params"]
    assert params["samplers"] == list(ORDER_LLAMACPP) and params["typical_p"] == 1.0 and params["top_n_sigma"] == -1.0


def test_props_tells_the_default_models_settings_and_marker(running):
    got = running.json("/props")
    assert got["modalities"] == {"vision": True, "audio": False} and got["media_marker"] == "<__media__>"
    assert got["total_slots"] == 1 and got["model_path"].endswith("tiny-qwen2.5-vl-f16.gguf")
    assert "<|im_start|>" in got["chat_template"] and got["build_info"].startswith("qvl ")
    params = got["default_generation_settings"]["params"]
    assert params["temperature"] == 0.0 and params["n_predict"] == -1 and params["seed"] == 299792458
    assert got["default_generation_settings"]["n_ctx"] == 4096


def test_props_of_a_model_named_in_the_query(running):
    got = running.json("/props?model=terse:1")  # stored with num_predict 3, seed 5
    assert got["default_generation_settings"]["params"]["seed"] == 5 and got["model_alias"].startswith("terse:1")


def test_n_probs_past_twenty_and_post_sampling_probs(running):
    """llama.cpp's n_probs has no cap of 20 (its alias `logprobs` too); post_sampling_probs reports
    the sampler chain's distribution: "prob" and "top_probs", the kept tokens only (top_k 3: at most
    three, adding to 1 with the token drawn among them), greedy's token alone at 1."""
    many = _done(running, {"prompt": "The sky is", "n_predict": 2, "logprobs": 50, "return_tokens": True})
    assert all(len(p["top_logprobs"]) == 50 for p in many["completion_probabilities"])
    body = {"prompt": "The sky is", "n_predict": 4, "n_probs": 5, "post_sampling_probs": True, "temperature": 1.0,
            "top_k": 3, "seed": 2, "return_tokens": True}
    got = _done(running, body)
    probs = got["completion_probabilities"]
    assert [p["id"] for p in probs] == got["tokens"]
    for p in probs:
        assert "logprob" not in p and 1 <= len(p["top_probs"]) <= 3
        assert sum(t["prob"] for t in p["top_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert p["prob"] == pytest.approx(next(t["prob"] for t in p["top_probs"] if t["id"] == p["id"]))
        assert [t["prob"] for t in p["top_probs"]] == sorted((t["prob"] for t in p["top_probs"]), reverse=True)
    # the same draw as without the report
    assert _done(running, {**body, "post_sampling_probs": False})["tokens"] == got["tokens"]
    greedy = _done(running, {"prompt": "The sky is", "n_predict": 2, "n_probs": 5, "post_sampling_probs": True,
                             "temperature": 0, "return_tokens": True})
    assert all(p["prob"] == 1.0 and p["top_probs"] == [{"id": p["id"], "token": p["token"], "bytes": p["bytes"],
                                                       "prob": 1.0}] for p in greedy["completion_probabilities"])


def test_a_streams_probabilities_come_with_their_chunks(running):
    """With n_probs a stream's chunks carry their own tokens' completion_probabilities (llama-server's
    partial results), together the whole reply's, and its last event none."""
    body = {"prompt": "The sky is", "n_predict": 6, "n_probs": 3}
    whole = _done(running, body)["completion_probabilities"]
    status, data = running.request("/completion", {"model": "tiny:1", **body, "stream": True})
    events = [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")]
    assert status == 200 and "completion_probabilities" not in events[-1]
    streamed = [p for e in events[:-1] for p in e.get("completion_probabilities", [])]
    assert [p["id"] for p in streamed] == [p["id"] for p in whole] and len(streamed) == 6
    for got, want in zip(streamed, whole):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-5)


def test_token_id_prompts_as_llama_server_takes_them(running):
    """A prompt of token ids (as /tokenize gives them) is read as those tokens: the string's own
    answer; ids mixed with texts are the texts' tokens in their places; [[ids]] is one prompt;
    a picture's pad id, which needs its picture, is refused."""
    text = "The sky is blue and the"
    ids = running.json("/tokenize", {"content": text})["tokens"]
    want = _done(running, {"prompt": text, "n_predict": 5, "return_tokens": True})
    for prompt in (ids, [ids], ids[:2] + [running.json("/detokenize", {"tokens": ids[2:]})["content"]]):
        got = _done(running, {"prompt": prompt, "n_predict": 5, "return_tokens": True})
        assert got["tokens"] == want["tokens"] and got["tokens_evaluated"] == len(ids), prompt
        assert got["prompt"] == text
    pad = running.json("/tokenize", {"content": "<|image_pad|>"})["tokens"]
    status, data = running.request("/completion", {"model": "tiny:1", "prompt": ids + pad})
    assert status == 400 and "no picture's pad" in json.loads(data)["error"]
    text_ids = running.json("/v1/completions", {"model": "tiny:1", "prompt": ids, "max_tokens": 5})
    assert text_ids["choices"][0]["text"] == want["content"] and text_ids["usage"]["prompt_tokens"] == len(ids)
    echoed = running.json("/v1/completions", {"model": "tiny:1", "prompt": [ids], "max_tokens": 0, "echo": True,
                                              "logprobs": 1})
    scored = echoed["choices"][0]
    assert scored["text"] == text and len(scored["logprobs"]["tokens"]) == len(ids)


def _events(running, body):
    status, data = running.request("/completion", {"model": "tiny:1", **body, "stream": True})
    assert status == 200, data
    return [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")]


def test_several_prompts_are_llama_servers_batch(running):
    """A list of prompts with no token id in it (strings, id lists, multimodal objects) is several
    prompts: an array of replies, each the one a request of that prompt alone gets, in order and
    indexed; streamed, each prompt's events in turn, named by its index, each ending with its stop."""
    ids = running.json("/tokenize", {"content": "Count to ten:"})["tokens"]
    prompts = ["The sky is", ids, {"prompt_string": "Hello there"}]
    alone = [_done(running, {"prompt": p, "n_predict": 4, "return_tokens": True}) for p in prompts]
    got = _done(running, {"prompt": prompts, "n_predict": 4, "return_tokens": True})
    assert isinstance(got, list) and [r["index"] for r in got] == [0, 1, 2]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in alone]
    assert [r["content"] for r in got] == [r["content"] for r in alone]
    assert [r["prompt"] for r in got] == ["The sky is", "Count to ten:", "Hello there"]
    assert len({r["tokens_evaluated"] for r in got}) == 3
    one = _done(running, {"prompt": ["The sky is"], "n_predict": 4, "return_tokens": True})
    assert isinstance(one, dict) and one["tokens"] == alone[0]["tokens"]  # one prompt: the reply alone
    events = _events(running, {"prompt": prompts, "n_predict": 4})
    indexes = [e["index"] for e in events]
    assert indexes == sorted(indexes) and set(indexes) == {0, 1, 2}
    for i in range(3):
        mine = [e for e in events if e["index"] == i]
        assert [e["stop"] for e in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(e["content"] for e in mine) == alone[i]["content"] and mine[-1]["tokens_predicted"] == 4


def test_n_cmpl_completions_take_the_next_seeds(running):
    """n_cmpl (or its alias n): completion j of a prompt is the one made with the seed + j, as
    llama-server's child tasks are; prompt k's at index k * n_cmpl + j; a random seed stays random."""
    body = {"n_predict": 5, "temperature": 1.5, "return_tokens": True}
    want = {(p, s): _done(running, {**body, "prompt": p, "seed": s})["tokens"] for p in ("Hi", "Count:")
            for s in (7, 8)}
    assert want[("Hi", 7)] != want[("Hi", 8)]
    got = _done(running, {**body, "prompt": ["Hi", "Count:"], "seed": 7, "n_cmpl": 2})
    assert [r["index"] for r in got] == [0, 1, 2, 3]
    assert [r["tokens"] for r in got] == [want[("Hi", 7)], want[("Hi", 8)], want[("Count:", 7)], want[("Count:", 8)]]
    alias = _done(running, {**body, "prompt": "Hi", "seed": 7, "n": 2})
    assert [r["tokens"] for r in alias] == [want[("Hi", 7)], want[("Hi", 8)]]
    events = _events(running, {**body, "prompt": "Hi", "seed": 7, "n_cmpl": 2})
    for j in (0, 1):
        assert [t for e in events if e["index"] == j and not e["stop"] for t in e["tokens"]] == want[("Hi", 7 + j)]


def test_each_completions_seed():
    from qvl.runtime.llamacpp_completion import each_completion
    from qvl.runtime.sampling import RANDOM_SEED

    seeds = [k.get("seed") for k in each_completion(3, "n", {"seed": 5}, {})]
    assert seeds == [5, 6, 7]
    assert [k["seed"] for k in each_completion(3, "n", {"seed": 2**32 - 2}, {})] == [2**32 - 2, RANDOM_SEED, 0]
    assert [k["seed"] for k in each_completion(2, "n", {"seed": -1}, {})] == [-1, -1]  # random, each its own
    assert [k.get("seed") for k in each_completion(2, "n", {}, {"seed": 40})] == [None, 41]  # the stored seed on


def test_response_fields_keep_those_fields(running):
    """llama-server's response_fields: only the fields named, a nested one brought up under its
    path's name, one the reply lacks left out; a stream's last event alike, its chunks whole."""
    body = {"prompt": "Count:", "n_predict": 6, "return_tokens": True}
    whole = _done(running, body)
    assert whole["has_new_line"] == ("\n" in whole["content"])
    paths = ["content", "generation_settings/n_predict", "timings/predicted_n", "nope", "timings/nope/x"]
    got = _done(running, {**body, "response_fields": paths})
    assert got == {"content": whole["content"], "generation_settings/n_predict": 6, "timings/predicted_n": 6}
    events = _events(running, {**body, "response_fields": ["stop_type", "tokens_predicted"]})
    assert events[-1] == {"stop_type": "limit", "tokens_predicted": 6}
    assert all("content" in e and "tokens" in e for e in events[:-1])
    several = _done(running, {**body, "prompt": ["Count:", "Hi"], "response_fields": ["index", "tokens_predicted"]})
    assert several == [{"index": 0, "tokens_predicted": 6}, {"index": 1, "tokens_predicted": 6}]
