"""`qvl serve`'s OpenAI endpoints (openai_api.py): completions, stream usage, logprobs and echo,
checked against the same model called in Python."""

from __future__ import annotations

import json

import pytest


def test_openai_completions_continue_the_prompt_as_it_is(running, reference):
    """/v1/completions: the prompt without the chat template, 16 tokens unless max_tokens says."""
    want = reference.generate("The cat sat on", template=False, max_new_tokens=16)
    got = running.json("/v1/completions", {"model": "tiny:1", "prompt": "The cat sat on"})
    assert got["object"] == "text_completion" and got["id"].startswith("cmpl-")
    assert got["choices"] == [{"index": 0, "text": want.text, "logprobs": None, "finish_reason": "length"}]
    assert got["usage"]["prompt_tokens"] == want.prompt_tokens == 4 and got["usage"]["completion_tokens"] == 16
    short = reference.generate("The cat sat on", template=False, max_new_tokens=5).text
    status, data = running.request("/v1/completions", {"model": "tiny:1", "prompt": ["The cat sat on"],
                                                       "max_tokens": 5, "stream": True})
    frames = data.decode().split("\n\n")
    assert status == 200 and frames[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == short
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[0]["object"] == "text_completion"
    for body, expect in [({"prompt": []}, "prompt: a string, token ids, or a list of 1 to 256 of them"),
                         ({"prompt": ["a", 2.5]}, "prompt[1]: a string or token ids"),
                         ({"prompt": ["a", [5, 10**9]], "stream": True}, "a prompt of token ids: 1 or more"),
                         ({"prompt": "a", "suffix": "z"}, "suffix: not supported"),
                         ({"prompt": "a", "n": 0}, "n 0: 1 to 16 choices"),
                         ({"prompt": "a", "n": "2"}, "n '2': 1 to 16 choices")]:
        status, data = running.request("/v1/completions", {"model": "tiny:1", **body})
        assert status == 400 and expect in json.loads(data)["error"], data


def test_openai_stream_usage(running, reference):
    want = reference.chat([{"role": "user", "content": "Describe it."}], max_new_tokens=4)
    body = {"model": "tiny:1", "max_tokens": 4, "messages": [{"role": "user", "content": "Describe it."}],
            "stream": True, "stream_options": {"include_usage": True}}
    running.json("/v1/chat/completions", {**body, "stream": False})  # the cache then holds the prompt
    status, data = running.request("/v1/chat/completions", body)
    chunks = [json.loads(f.removeprefix("data: ")) for f in data.decode().split("\n\n")[:-2]]
    assert status == 200 and chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": want.prompt_tokens, "completion_tokens": 4, "total_tokens": want.prompt_tokens + 4,
        "prompt_tokens_details": {"cached_tokens": want.prompt_tokens - 1}}  # all but the last, read again
    assert "usage" not in chunks[-2] and chunks[-2]["choices"][0]["finish_reason"] == "length"
    status, data = running.request("/v1/chat/completions", {**body, "n": 17})
    assert status == 400 and "n 17: 1 to 16 choices" in json.loads(data)["error"]


def test_n_choices_one_after_another(running, reference):
    """OpenAI's n: choice i is the generation with the seed + i (sampled: different texts), each
    with its index and finish reason, the usage counting every choice's tokens; streamed, the
    choices follow one another, each chunk naming its index."""
    messages = [{"role": "user", "content": "Describe it."}]
    want = [reference.chat(messages, max_new_tokens=5, temperature=1.5, seed=7 + i).text for i in range(3)]
    assert len(set(want)) == 3
    body = {"model": "tiny:1", "max_tokens": 5, "messages": messages, "temperature": 1.5, "seed": 7, "n": 3}
    got = running.json("/v1/chat/completions", body)
    assert [c["message"]["content"] for c in got["choices"]] == want
    assert [c["index"] for c in got["choices"]] == [0, 1, 2] and got["usage"]["completion_tokens"] == 15
    assert got["usage"]["prompt_tokens"] == reference.chat(messages, max_new_tokens=1).prompt_tokens
    status, data = running.request("/v1/chat/completions", {**body, "stream": True})
    chunks = [json.loads(f.removeprefix("data: ")) for f in data.decode().split("\n\n")[:-2]]
    texts = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i)
             for i in range(3)]
    assert status == 200 and texts == want
    ends = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert [(e["index"], e["finish_reason"]) for e in ends] == [(0, "length"), (1, "length"), (2, "length")]
    plain = running.json("/v1/completions", {"model": "tiny:1", "prompt": "Once", "max_tokens": 4, "n": 2,
                                             "temperature": 1.5, "seed": 3})
    assert [c["text"] for c in plain["choices"]] == [
        reference.generate("Once", template=False, max_new_tokens=4, temperature=1.5, seed=s).text for s in (3, 4)]


def test_openai_logprobs_and_echo(running, reference):
    """/v1/completions with echo and logprobs scores a prompt (lm-evaluation-harness's way): each
    token's log-probability given the ones before it, from the model's own logits; generated
    tokens carry theirs, the likeliest alternatives first; chat's logprobs spell its text."""
    import torch

    prompt = "The cat sat on the mat"
    got = running.json("/v1/completions", {"model": "tiny:1", "prompt": prompt, "max_tokens": 0, "echo": True,
                                           "logprobs": 2})
    lp = got["choices"][0]["logprobs"]
    ids = reference.tokenizer.encode(prompt).ids
    want = torch.log_softmax(reference.prompt_logits(prompt, template=False).float(), -1)
    assert got["choices"][0]["text"] == prompt and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx([float(want[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                     abs=1e-5)
    assert all(len(t) == 2 and max(t.values()) >= lp["token_logprobs"][i]
               for i, t in enumerate(lp["top_logprobs"][1:], 1))
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert got["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # a greedy continuation: each token the likeliest, its log-probability the first alternative's
    got = running.json("/v1/completions", {"model": "tiny:1", "prompt": prompt, "max_tokens": 4, "logprobs": 3})
    lp = got["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and "".join(lp["tokens"]) == got["choices"][0]["text"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and top[token] == pytest.approx(value) and value == pytest.approx(max(top.values()))
    first = float(want[-1].max())  # the first generated token's, from the prompt's last logits
    assert lp["token_logprobs"][0] == pytest.approx(first, abs=1e-3)
    chat = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 5, "logprobs": True,
                                                 "top_logprobs": 1, "messages": [{"role": "user", "content": "Hi"}]})
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(c["top_logprobs"]) == 1 for c in content)
    assert bytes(b for c in content for b in c["bytes"]).decode() == chat["choices"][0]["message"]["content"]
    for body, expect in [({"logprobs": 21}, "logprobs 21: 0 to 20"), ({"echo": True, "stream": True},
                                                                      "echo: not with stream")]:
        status, data = running.request("/v1/completions", {"model": "tiny:1", "prompt": "x", **body})
        assert status == 400 and expect in json.loads(data)["error"], data


def test_post_sampling_probs_are_the_chains_in_llama_servers_fields(running, reference):
    """llama-server's post_sampling_probs on a chat: each token's id, bytes, prob and top_probs from
    the distribution the sampler chain drew it from (top-k 3: three alternatives at most, summing
    to 1 with the rest; greedy: the token alone at 1), as Model.chat reports it with the chain's
    post_sampling_probs; /v1/completions' log-probabilities come from the same distribution."""
    import math

    from qvl.runtime.sampler_chain import ChainOptions

    messages = [{"role": "user", "content": "Hi"}]
    body = {"model": "tiny:1", "max_tokens": 5, "logprobs": True, "top_logprobs": 4, "messages": messages,
            "temperature": 0.9, "top_k": 3, "seed": 11, "post_sampling_probs": True}
    content = running.json("/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    want = reference.chat(messages, max_new_tokens=5, temperature=0.9, top_k=3, seed=11, logprobs=4,
                          chain=ChainOptions(post_sampling_probs=True))
    assert [c["id"] for c in content] == want.token_ids and "logprob" not in content[0]
    for c, scored in zip(content, want.logprobs):
        assert c["prob"] == pytest.approx(math.exp(scored.logprob), rel=1e-6) and 0 < c["prob"] <= 1
        assert 1 <= len(c["top_probs"]) <= 3 and sum(t["prob"] for t in c["top_probs"]) == pytest.approx(1, abs=1e-5)
        assert c["id"] in [t["id"] for t in c["top_probs"]]
    greedy = running.json("/v1/chat/completions", {**body, "temperature": 0})["choices"][0]["logprobs"]["content"]
    assert all(c["prob"] == 1 and [t["prob"] for t in c["top_probs"]] == [1] for c in greedy)
    legacy = running.json("/v1/completions", {"model": "tiny:1", "prompt": "Hi", "max_tokens": 4, "logprobs": 2,
                                              "temperature": 0, "post_sampling_probs": True})
    assert legacy["choices"][0]["logprobs"]["token_logprobs"] == [0.0] * 4  # greedy's token alone, at 1


def sse(data: bytes) -> list[dict]:
    frames = data.decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]


def test_streamed_logprobs_come_with_their_chunks(running):
    """A stream's chunks each carry the logprobs of the tokens scored since the chunk before:
    together they are the unstreamed answer's, and (chat) their bytes spell the chunks' text."""
    body = {"model": "tiny:1", "max_tokens": 6, "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "user", "content": "Hi"}]}
    whole = running.json("/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    status, data = running.request("/v1/chat/completions", {**body, "stream": True})
    chunks = [c["choices"][0] for c in sse(data)]
    assert status == 200 and chunks[0]["logprobs"] is None  # the role's chunk
    parts = [c["logprobs"]["content"] for c in chunks if c["logprobs"] is not None]
    assert len(parts) >= 3 and [e for p in parts for e in p] == whole
    for c in chunks[1:]:
        scored = c["logprobs"]["content"] if c["logprobs"] else []
        assert bytes(b for e in scored for b in e["bytes"]) == c["delta"].get("content", "").encode()
    body = {"model": "tiny:1", "prompt": "The cat sat on", "max_tokens": 6, "logprobs": 1}
    whole = running.json("/v1/completions", body)["choices"][0]["logprobs"]
    status, data = running.request("/v1/completions", {**body, "stream": True})
    parts = [c["choices"][0]["logprobs"] for c in sse(data) if c["choices"][0]["logprobs"] is not None]
    assert len(parts) >= 3
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):  # offsets run on across chunks
        assert [v for p in parts for v in p[key]] == whole[key], key


def test_llama_cpp_sampler_fields(running, reference):
    """As llama.cpp's server reads them on its OpenAI endpoints: top_k, min_p, the repeat penalty,
    typical_p, DRY, mirostat and `samplers`; qvl's order unless `samplers` names one."""
    from qvl.runtime.sampler_chain import ChainOptions

    messages = [{"role": "user", "content": "Count: one two three"}]
    want = reference.chat(messages, max_new_tokens=8, temperature=0.9, top_k=30, min_p=0.01, seed=3,
                          repeat_penalty=1.2, chain=ChainOptions(typical_p=0.9, dry_multiplier=0.6)).text
    got = running.json("/v1/chat/completions", {"model": "tiny:1", "messages": messages, "max_tokens": 8,
                                                "temperature": 0.9, "top_k": 30, "min_p": 0.01, "seed": 3,
                                                "repeat_penalty": 1.2, "typical_p": 0.9, "dry_multiplier": 0.6})
    assert got["choices"][0]["message"]["content"] == want
    assert want != reference.chat(messages, max_new_tokens=8, temperature=0.9, seed=3).text  # the fields count
    greedy = reference.generate("The cat sat on", template=False, max_new_tokens=6).text
    hot = running.json("/v1/completions", {"model": "tiny:1", "prompt": "The cat sat on", "max_tokens": 6,
                                           "temperature": 4.0, "top_k": 1, "samplers": "kt"})
    assert hot["choices"][0]["text"] == greedy  # top_k 1 before the temperature: the likeliest token
    status, data = running.request("/v1/chat/completions", {"model": "tiny:1", "messages": messages,
                                                            "mirostat": 4})
    assert status == 400 and "mirostat 4: 0 (off), 1 or 2" in json.loads(data)["error"]


def test_replies_carry_llama_servers_timings(running):
    """As llama-server's OpenAI replies: `timings` (cache_n, prompt_* and predicted_* n, ms, per
    token, per second) on a reply, or on a stream's last chunk alone (the usage chunk, when asked)."""
    body = {"model": "tiny:1", "max_tokens": 5, "messages": [{"role": "user", "content": "Timings?"}]}
    got = running.json("/v1/chat/completions", body)
    t, usage = got["timings"], got["usage"]
    assert t["predicted_n"] == usage["completion_tokens"] == 5 and t["cache_n"] == usage["prompt_tokens_details"][
        "cached_tokens"]
    assert t["prompt_n"] + t["cache_n"] == usage["prompt_tokens"] and t["predicted_ms"] > 0
    # llama.cpp's rate is over decode steps: the first token came from the prompt's pass
    assert t["predicted_per_second"] == pytest.approx(4 / t["predicted_ms"] * 1e3)
    assert t["predicted_per_token_ms"] == pytest.approx(t["predicted_ms"] / 4)
    assert "draft_n" not in t  # no --spec-type
    text = running.json("/v1/completions", {"model": "tiny:1", "prompt": "Timings", "max_tokens": 3})
    tt = text["timings"]
    assert tt["predicted_n"] == 3 and tt["prompt_n"] + tt["cache_n"] == text["usage"]["prompt_tokens"]
    for options in ({}, {"stream_options": {"include_usage": True}}):
        status, data = running.request("/v1/chat/completions", {**body, "stream": True, **options})
        chunks = [json.loads(f.removeprefix("data: ")) for f in data.decode().split("\n\n")[:-2]]
        assert status == 200 and [i for i, c in enumerate(chunks) if "timings" in c] == [len(chunks) - 1]
        assert chunks[-1]["timings"]["predicted_n"] == 5 and ("usage" in chunks[-1]) == bool(options)
        assert chunks[-1]["choices"] == [] if options else chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_cache_prompt_false_reads_the_prompt_anew(running):
    """llama-server's cache_prompt on the OpenAI endpoints: false reads the whole prompt again (no
    cached tokens), giving the logprobs a cached read gives up to the order of sums; by default
    the same chat again reads only what the cache lacks."""
    body = {"model": "tiny:1", "max_tokens": 3, "logprobs": True, "messages": [{"role": "user", "content": "Cache?"}]}
    running.json("/v1/chat/completions", body)
    cached = running.json("/v1/chat/completions", body)
    anew = running.json("/v1/chat/completions", {**body, "cache_prompt": False})
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert anew["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 == anew["timings"]["cache_n"]
    assert anew["timings"]["prompt_n"] == anew["usage"]["prompt_tokens"]
    got, want = (r["choices"][0]["logprobs"]["content"] for r in (anew, cached))
    assert [c["token"] for c in got] == [c["token"] for c in want]
    assert [c["logprob"] for c in got] == pytest.approx([c["logprob"] for c in want], abs=1e-3)
    text = running.json("/v1/completions", {"model": "tiny:1", "prompt": "Cache?", "max_tokens": 2,
                                            "cache_prompt": False})
    assert text["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_several_prompts_are_answered_in_turn(running):
    """/v1/completions with a list of prompts (strings and token ids), as OpenAI and lm-evaluation-
    harness send them: prompt k's n choices at indexes k*n.., each what the prompt alone gets;
    usage counts each prompt's tokens once; echo scoring scores each; a stream's chunks say their
    choice's index."""
    texts = ["The cat sat on", "A dog", "Hi there"]
    ids = running.json("/tokenize", {"content": texts[1]})["tokens"]
    body = {"model": "tiny:1", "max_tokens": 3, "temperature": 0.9, "seed": 4, "n": 2, "cache_prompt": False}
    alone = [running.json("/v1/completions", {**body, "prompt": t}) for t in texts]
    both = running.json("/v1/completions", {**body, "prompt": [texts[0], ids, texts[2]]})
    assert [c["index"] for c in both["choices"]] == list(range(6))
    assert [c["text"] for c in both["choices"]] == [c["text"] for a in alone for c in a["choices"]]
    assert both["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert both["usage"]["completion_tokens"] == 6 * 3
    score = {"model": "tiny:1", "max_tokens": 0, "echo": True, "logprobs": 1}
    each = [running.json("/v1/completions", {**score, "prompt": t})["choices"][0] for t in texts]
    together = running.json("/v1/completions", {**score, "prompt": texts})
    assert [c["text"] for c in together["choices"]] == texts
    assert [c["logprobs"]["tokens"] for c in together["choices"]] == [c["logprobs"]["tokens"] for c in each]
    for c, e in zip(together["choices"], each):
        assert c["logprobs"]["token_logprobs"][1:] == pytest.approx(e["logprobs"]["token_logprobs"][1:], abs=1e-4)
    status, data = running.request("/v1/completions", {**body, "n": 1, "prompt": texts[:2], "stream": True})
    chunks = [c["choices"][0] for c in sse(data)]
    for k in (0, 1):
        text = "".join(c["text"] for c in chunks if c["index"] == k)
        assert text == alone[k]["choices"][0]["text"]
