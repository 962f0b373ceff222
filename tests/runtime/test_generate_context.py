"""/api/generate's `context` (generate_context.py): a reply's token ids, sent back, go on with the
conversation as /api/chat would (greedy on the tiny model, so the texts must be identical)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from serving import png

from qvl.runtime.chat import render


def ask(running, prompt, **more):
    body = {"model": "tiny:1", "prompt": prompt, "stream": False, "options": {"num_predict": 6}, **more}
    return running.json("/api/generate", body)


def test_context_is_the_rendered_prompt_and_answer(running, reference):
    got = ask(running, "Describe it.")
    text = render(reference.chat_template, reference.messages_for("Describe it.", 0))
    assert got["context"] == reference.tokenizer.encode(text + got["response"], add_special_tokens=False).ids
    assert reference.tokenizer.decode(got["context"], skip_special_tokens=False) == text + got["response"]
    streamed = running.lines("/api/generate", {"model": "tiny:1", "prompt": "Describe it.",
                                               "options": {"num_predict": 6}})
    assert streamed[-1]["context"] == got["context"] and all("context" not in e for e in streamed[:-1])
    assert ask(running, "Describe it.", context=[])["context"] == got["context"]  # [] is no context
    assert ask(running, "Describe it.", context=None)["context"] == got["context"]


def test_a_context_goes_on_as_chat_does(running, reference):
    first = ask(running, "Describe it.")
    second = ask(running, "And then?", context=first["context"])
    model = running.service.loaded.model
    # the context was in the cache: only the new turn read (its 12 or so tokens, not the 20 of the first)
    g = model.last_generation
    assert g.reused_tokens >= len(first["context"]) - 1 and g.prompt_tokens - g.reused_tokens < 15
    want = reference.chat([{"role": "user", "content": "Describe it."},
                           {"role": "assistant", "content": first["response"]},
                           {"role": "user", "content": "And then?"}], max_new_tokens=6)
    assert second["response"] == want.text and second["prompt_eval_count"] == want.prompt_tokens
    third = ask(running, "Why?", context=second["context"])
    want = reference.chat([{"role": "user", "content": "Describe it."},
                           {"role": "assistant", "content": first["response"]},
                           {"role": "user", "content": "And then?"},
                           {"role": "assistant", "content": second["response"]},
                           {"role": "user", "content": "Why?"}], max_new_tokens=6)
    assert third["response"] == want.text
    text = reference.tokenizer.decode(third["context"], skip_special_tokens=False)
    assert text.count("You are a helpful assistant.") == 1 and text.count("<|im_start|>user") == 3


def test_a_stored_system_prompt_is_not_said_again(running, reference):
    first = running.json("/api/generate", {"model": "terse:1", "prompt": "Hi", "stream": False})
    second = running.json("/api/generate", {"model": "terse:1", "prompt": "More", "stream": False,
                                            "context": first["context"]})
    want = reference.chat([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": first["response"]},
                           {"role": "user", "content": "More"}], max_new_tokens=3, seed=5)
    assert second["response"] == want.text
    assert reference.tokenizer.decode(second["context"]).count("Answer in one word.") == 1


def test_images_of_a_context_are_sent_again(running, reference):
    data = png()
    b64 = base64.b64encode(data).decode()
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    first = ask(running, "What colour?", images=[b64])
    pad = reference.tokenizer.token_to_id("<|image_pad|>")
    assert first["context"].count(pad) == 1  # one slot for the picture, not its tokens
    status, body = running.request("/api/generate", {"model": "tiny:1", "prompt": "Sure?", "stream": False,
                                                     "context": first["context"]})
    assert status == 400 and "holds 1 image(s) and 0 came" in json.loads(body)["error"]
    second = ask(running, "Sure?", context=first["context"], images=[b64])
    want = reference.chat([{"role": "user", "content": [{"type": "image", "image": picture},
                                                        {"type": "text", "text": "What colour?"}]},
                           {"role": "assistant", "content": first["response"]},
                           {"role": "user", "content": "Sure?"}], max_new_tokens=6)
    assert second["response"] == want.text and second["prompt_eval_count"] == want.prompt_tokens
    other = base64.b64encode(png((10, 200, 40), (84, 56))).decode()  # a new picture for the new turn: after
    third = ask(running, "And this one?", context=first["context"], images=[b64, other])
    green = Image.open(io.BytesIO(base64.b64decode(other))).convert("RGB")
    want = reference.chat([{"role": "user", "content": [{"type": "image", "image": picture},
                                                        {"type": "text", "text": "What colour?"}]},
                           {"role": "assistant", "content": first["response"]},
                           {"role": "user", "content": [{"type": "image", "image": green},
                                                        {"type": "text", "text": "And this one?"}]}],
                          max_new_tokens=6)
    assert third["response"] == want.text and third["context"].count(pad) == 2


def test_raw_prompt_follows_the_context_text(running, reference):
    first = ask(running, "Describe it.")
    head = reference.tokenizer.decode(first["context"], skip_special_tokens=False)
    got = ask(running, " More:", context=first["context"], raw=True)
    assert got["response"] == reference.generate(head + " More:", template=False, max_new_tokens=6).text


@pytest.mark.parametrize("context, says", [("1 2 3", "a list of token ids"), ([1, "2"], "a list of token ids"),
                                           ([True], "a list of token ids"), ([-1], "token id -1 is not"),
                                           ([10 ** 9], "token id 1000000000 is not")])
def test_a_bad_context_is_a_400(running, context, says):
    status, body = running.request("/api/generate", {"model": "tiny:1", "prompt": "Hi", "context": context})
    assert status == 400 and says in json.loads(body)["error"]
