"""Frequency and presence penalties (OpenAI's, llama.cpp's --frequency-penalty / --presence-penalty)
in a whole generation: greedy tokens equal a step-by-step replay that penalizes the raw logits by
hand, and they reach the model from qvl-run, Ollama's options, a Modelfile and OpenAI's fields."""

from __future__ import annotations

import torch

from qvl.runtime.chat import render
from qvl.runtime.modelfile import check_params

PROMPT = "<|im_start|>user\nCount: one two three<|im_end|>\n<|im_start|>assistant\n"


def replay(model, n: int, frequency: float, presence: float) -> list[int]:
    ids = model.tokenize(PROMPT, [])[0]
    out: list[int] = []
    for _ in range(n):
        logits = model.decoder.logits(torch.cat(model.token_hidden(ids + out))[-1:])[0].float()
        recent = out[-64:]  # the default window: the last 64 generated tokens
        for tok in set(recent):
            logits[tok] -= recent.count(tok) * frequency + presence
        out.append(int(torch.argmax(logits)))
    return out


def test_greedy_with_penalties_is_the_replay(reference):
    plain = reference.generate(PROMPT, template=False, max_new_tokens=8).token_ids
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself: there is something to penalize
    for frequency, presence in ((1.5, 0.0), (0.0, 2.0), (0.7, 0.7)):
        got = reference.generate(PROMPT, template=False, max_new_tokens=8, frequency_penalty=frequency,
                                 presence_penalty=presence).token_ids
        assert got == replay(reference, 8, frequency, presence) and got != plain


def test_the_penalties_reach_the_model_from_every_door(running, reference):
    want = reference.chat([{"role": "user", "content": "Count: one two three"}], max_new_tokens=6,
                          frequency_penalty=1.5, presence_penalty=0.5).text
    assert want != reference.chat([{"role": "user", "content": "Count: one two three"}], max_new_tokens=6).text
    openai = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 6, "frequency_penalty": 1.5,
                                                   "presence_penalty": 0.5,
                                                   "messages": [{"role": "user", "content": "Count: one two three"}]})
    assert openai["choices"][0]["message"]["content"] == want
    ollama = running.json("/api/chat", {"model": "tiny:1", "stream": False, "messages": [
        {"role": "user", "content": "Count: one two three"}],
        "options": {"num_predict": 6, "frequency_penalty": 1.5, "presence_penalty": 0.5}})
    assert ollama["message"]["content"] == want
    assert check_params({"presence_penalty": "0.5", "frequency_penalty": 1}, strict=True) == {
        "presence_penalty": 0.5, "frequency_penalty": 1.0}  # a Modelfile's PARAMETERs


def test_logit_bias_from_openai_fields(running, reference):
    messages = [{"role": "user", "content": "Count: one two three"}]
    plain = reference.chat(messages, max_new_tokens=4)
    first = plain.token_ids[0]
    want = reference.chat(messages, max_new_tokens=4, logit_bias={first: -float("inf")})
    assert want.token_ids[0] != first and first not in want.token_ids  # banned everywhere
    for path, body in (("/v1/chat/completions", {"messages": messages}),
                       ("/v1/completions", {"prompt": render(reference.chat_template, messages)})):
        got = running.json(path, {"model": "tiny:1", "max_tokens": 4, "logit_bias": {str(first): -100}, **body})
        choice = got["choices"][0]
        assert choice.get("message", {}).get("content", choice.get("text")) == want.text
    status, data = running.request("/v1/chat/completions", {"model": "tiny:1", "messages": messages,
                                                            "logit_bias": {"x": 1}})
    assert status == 400 and "logit_bias" in data.decode()
    status, data = running.request("/v1/chat/completions", {"model": "tiny:1", "messages": messages,
                                                            "logit_bias": {"99999999": 1}})
    assert status == 400 and "not a token id of this model" in data.decode()


def test_ignore_eos_from_openai_fields(running):
    body = {"model": "tiny:1", "prompt": "Hi", "max_tokens": 3, "logit_bias": {"151645": 100}}
    ended = running.json("/v1/completions", body)["choices"][0]
    assert ended["text"] == "" and ended["finish_reason"] == "stop"
    kept = running.json("/v1/completions", {**body, "ignore_eos": True})
    assert kept["choices"][0]["finish_reason"] == "length" and kept["usage"]["completion_tokens"] == 3


def test_greedy_with_dry_is_the_replay(reference):
    """DRY (llama.cpp's, in the greedy answer too, as llama.cpp's chain runs it before its
    temperature): greedy tokens equal a replay that takes dry_penalties from the raw logits."""
    from qvl.runtime.dry import DEFAULT_BREAKERS, breakers, dry_penalties
    from qvl.runtime.sampler_chain import ChainOptions

    n = 16
    plain = reference.generate(PROMPT, template=False, max_new_tokens=n).token_ids
    chain = ChainOptions(dry_multiplier=2.0, dry_allowed_length=1)
    got = reference.generate(PROMPT, template=False, max_new_tokens=n, chain=chain).token_ids
    found = breakers(reference.tokenizer, DEFAULT_BREAKERS)
    ids = reference.tokenize(PROMPT, [])[0]
    out: list[int] = []
    cut_any = False
    for _ in range(n):
        logits = reference.decoder.logits(torch.cat(reference.token_hidden(ids + out))[-1:])[0].float()
        for tok, cut in dry_penalties(out, 2.0, 1.75, 1, 64, found).items():
            logits[tok] -= cut
            cut_any = True
        out.append(int(torch.argmax(logits)))
    assert cut_any and got == out and got != plain


def test_llama_servers_penalties_see_the_prompt(reference, running):
    """/completion's penalties (and DRY) see the prompt's text tokens before the answer's, as
    llama-server's sampler accepts the prompt: its greedy tokens are a replay whose repeat penalty
    covers prompt + answer; the picture's pad tokens are not among them."""
    from qvl.runtime.sampler_chain import ChainOptions

    plain = reference.generate(PROMPT, template=False, max_new_tokens=3).token_ids
    prompt = PROMPT + reference.tokenizer.decode(plain)  # an answer begun: what it repeats is in the prompt
    ids = reference.tokenize(prompt, [])[0]
    out: list[int] = []
    for _ in range(8):
        logits = reference.decoder.logits(torch.cat(reference.token_hidden(ids + out))[-1:])[0].float()
        recent = (ids + out)[-64:]
        for tok in set(recent):
            logits[tok] = logits[tok] / 3.0 if logits[tok] > 0 else logits[tok] * 3.0
        out.append(int(torch.argmax(logits)))
    seen = reference.generate(prompt, template=False, max_new_tokens=8, repeat_penalty=3.0,
                              chain=ChainOptions(prompt_seen=True)).token_ids
    assert seen == out
    assert seen != reference.generate(prompt, template=False, max_new_tokens=8, repeat_penalty=3.0).token_ids
    got = running.json("/completion", {"model": "tiny:1", "prompt": prompt, "n_predict": 8, "repeat_penalty": 3.0,
                                       "return_tokens": True})
    assert got["tokens"] == out


def test_the_prompt_the_penalties_see_has_no_picture_pads(reference, monkeypatch):
    """With a picture in the prompt, the history the sampler gets holds the prompt's text tokens
    (its vision start and end included, as mtmd's text chunks), not the picture's pad tokens."""
    from PIL import Image

    from qvl.runtime import model as model_module
    from qvl.runtime.sampler_chain import ChainOptions

    histories: list[list[int]] = []
    real = model_module.sample
    monkeypatch.setattr(model_module, "sample", lambda logits, history, p, gen: (
        histories.append(list(history)), real(logits, history, p, gen))[1])
    picture = Image.new("RGB", (56, 56), (200, 30, 30))
    ids = reference.tokenize("<|vision_start|><|image_pad|><|vision_end|>What is it?", [picture])[0]
    text = [t for t in ids if t != reference.image_pad_id]
    assert len(text) < len(ids)
    for seen, want in ((True, text), (False, [])):
        histories.clear()
        reference.generate("<|vision_start|><|image_pad|><|vision_end|>What is it?", [picture], template=False,
                           max_new_tokens=2, repeat_penalty=1.5, chain=ChainOptions(prompt_seen=seen))
        assert histories[0] == want and histories[1][:-1] == want
