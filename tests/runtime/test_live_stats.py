"""llama-server's figures of a running generation (runtime/live.py): `timings` on each streamed
chunk with a request's timings_per_token, prompt_progress events with return_progress (before the
prompt is read, after each 2048 of its tokens, at its end), the generation rates over decode steps
(the first token comes from the prompt's last pass, as llama.cpp counts it), and /metrics'
accepted tokens per draft position. The prompt read in parts of 2048 tokens gives the logits
reading it whole gives."""

from __future__ import annotations

import json

import pytest
import torch

from qvl.runtime.generation import Generation, llama_timings, server_timings
from qvl.runtime.live import PROGRESS_TOKENS, Live, PromptProgress
from qvl.runtime.loader import load
from qvl.runtime.usage import DraftCounts, Usage
from serving import MODEL

LONG = "a fox runs past the river and the owl " * 500  # about 4500 tokens: three parts of 2048


def _events(data: bytes) -> list[dict]:
    return [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")]


def _sse(data: bytes) -> list[dict]:
    frames = data.decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]


def test_rates_are_over_decode_steps():
    """server_timings as llama.cpp's server_slot_stats: n tokens are n - 1 decode steps; one token
    (or none) has no rate, 0 rather than infinite; the prompt's rate is over its tokens read."""
    t = server_timings(3, 10, 0.5, 5, 0.2, {})
    assert t["cache_n"] == 3 and t["prompt_n"] == 10 and t["prompt_ms"] == 500.0
    assert t["prompt_per_token_ms"] == 50.0 and t["prompt_per_second"] == 20.0
    assert t["predicted_n"] == 5 and t["predicted_ms"] == 200.0
    assert t["predicted_per_token_ms"] == 50.0 and t["predicted_per_second"] == 20.0
    for made in (0, 1):
        one = server_timings(0, 4, 0.1, made, 0.01, {})
        assert one["predicted_per_second"] == 0.0 == one["predicted_per_token_ms"]
    drafted = server_timings(0, 4, 0.1, 3, 0.1, {"draft_n": 6.0, "draft_n_accepted": 2.0, "decode_s": 1.0})
    assert drafted["draft_n"] == 6 and drafted["draft_n_accepted"] == 2 and "decode_s" not in drafted
    g = Generation("", [1, 2, 3], 9, {"prefill_s": 0.5, "vision_ms": 100.0, "decode_s": 0.4, "sampled_s": 0.3},
                   reused_tokens=4)
    t = llama_timings(g)
    assert t["prompt_n"] == 5 and t["prompt_ms"] == pytest.approx(600.0)  # the pictures' encode is the prompt's
    assert t["predicted_ms"] == pytest.approx(300.0)  # to the last token chosen, not the pass after it


def test_live_timings_and_progress_by_hand(monkeypatch):
    clock = iter([1.0, 1.5, 2.0, 2.25])
    monkeypatch.setattr("qvl.runtime.live.time.perf_counter", lambda: next(clock))
    live = Live(100, [], 40, t0=0.5)
    assert live.timings()["prompt_n"] == 0 and live.timings()["prompt_ms"] == 0.0  # nothing read yet
    assert live.progress(40) == PromptProgress(100, 40, 40, 500)  # at 1.0: the cache's tokens only
    assert live.progress(100) == PromptProgress(100, 40, 100, 1000)  # at 1.5
    assert live.timings()["prompt_n"] == 60 and live.timings()["prompt_ms"] == pytest.approx(1000.0)
    live.ids += [7, 8]
    live.chose()  # at 2.0 (both tokens counted there)
    t = live.timings()
    assert t["predicted_n"] == 2 and t["predicted_ms"] == pytest.approx(500.0) and t["predicted_per_second"] == 2.0
    assert PromptProgress(5, 1, 3, 9).to_json() == {"total": 5, "cache": 1, "processed": 3, "time_ms": 9}


@pytest.fixture(scope="module")
def exact(files):
    return load(files / MODEL, dtype=torch.float32)


def test_a_long_prompt_reports_its_parts_and_reads_as_one(exact):
    """A prompt of three parts: progress before it (nothing cached: 0), after 2048 and 4096 tokens
    and at its end, time running on; its first token's log-probabilities those of prompt_logits,
    which reads it whole (float32: the same passes of 512 tokens, within 1e-5)."""
    items = list(exact.generate(LONG, template=False, max_new_tokens=2, stream=True, progress=True,
                                cache_prompt=False, logprobs=3))
    progress = [i for i in items if isinstance(i, PromptProgress)]
    g = exact.last_generation
    n = g.prompt_tokens
    assert n > 2 * PROGRESS_TOKENS and [p.processed for p in progress] == [0, 2048, 4096, n]
    assert all(p.total == n and p.cache == 0 for p in progress)
    assert [p.time_ms for p in progress] == sorted(p.time_ms for p in progress)
    assert items.index(progress[-1]) < min(i for i, x in enumerate(items) if isinstance(x, str))
    whole = torch.log_softmax(exact.prompt_logits(LONG, template=False)[-1].float(), -1)
    first = g.logprobs[0]
    assert first.logprob == pytest.approx(float(whole[first.token]), abs=1e-5)
    assert [t for t, _ in first.top] == torch.topk(whole, 3).indices.tolist()
    plain = list(exact.generate("Hi", template=False, max_new_tokens=2, stream=True))
    assert not any(isinstance(i, PromptProgress) for i in plain)  # only when asked


def test_completion_stream_with_timings_per_token_and_progress(running):
    body = {"model": "tiny:1", "prompt": "Count to ten:", "n_predict": 6, "stream": True, "cache_prompt": False,
            "timings_per_token": True, "return_progress": True}
    status, data = running.request("/completion", body)
    events = _events(data)
    progress = [e for e in events if "prompt_progress" in e]
    chunks = [e for e in events[:-1] if "prompt_progress" not in e]
    n = events[-1]["tokens_evaluated"]
    assert status == 200 and [e["prompt_progress"]["processed"] for e in progress] == [0, n]
    assert events[:2] == progress and all(e["content"] == "" and e["tokens"] == [] for e in progress)
    first = progress[0]["timings"]  # before the prompt is read, as llama.cpp's first update
    assert first["prompt_n"] == 0 and first["prompt_ms"] == 0 and first["predicted_n"] == 0
    assert progress[1]["timings"]["prompt_n"] == n and progress[1]["timings"]["prompt_ms"] > 0
    assert [e["timings"]["predicted_n"] for e in chunks] == [e["tokens_predicted"] for e in chunks]
    ms = [e["timings"]["predicted_ms"] for e in chunks]
    assert ms == sorted(ms) and chunks[-1]["timings"]["predicted_n"] == 6
    final = events[-1]["timings"]
    assert final["predicted_n"] == 6 and final["predicted_ms"] >= ms[-1]
    assert all(e["timings"]["prompt_ms"] == final["prompt_ms"] for e in chunks)
    plain = _events(running.request("/completion", {**body, "timings_per_token": False, "return_progress": False})[1])
    assert all("timings" not in e and "prompt_progress" not in e for e in plain[:-1])
    assert "".join(e["content"] for e in plain) == "".join(e["content"] for e in events)


def test_chat_stream_with_timings_per_token_and_progress(running):
    """As llama-server's chat stream: the role's first chunk without timings, those of text with
    them, the finish reason's without and the usage chunk's with the whole answer's; a progress
    chunk carries the role's delta and prompt_progress."""
    body = {"model": "tiny:1", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}],
            "timings_per_token": True, "stream_options": {"include_usage": True}}
    chunks = _sse(running.request("/v1/chat/completions", body)[1])
    assert [i for i, c in enumerate(chunks) if "timings" not in c] == [0, len(chunks) - 2]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    made = [c["timings"]["predicted_n"] for c in chunks[1:-2]]
    assert made == sorted(made) and made[-1] == 5 == chunks[-1]["timings"]["predicted_n"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    shown = _sse(running.request("/v1/chat/completions", {**body, "return_progress": True,
                                                          "timings_per_token": False})[1])
    progress = [c for c in shown if "prompt_progress" in c]
    usage = shown[-1]["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]  # the same chat's prompt again: all but its last
    assert [c["prompt_progress"]["processed"] for c in progress] == [cached, usage["prompt_tokens"]]
    assert 0 < cached and all(c["prompt_progress"]["cache"] == cached for c in progress)
    assert all(c["choices"][0]["delta"] == {"role": "assistant", "content": ""} for c in progress)
    text = _sse(running.request("/v1/completions", {"model": "tiny:1", "prompt": "Hi", "max_tokens": 3,
                                                    "stream": True, "return_progress": True})[1])
    marks = [c for c in text if "prompt_progress" in c]
    assert len(marks) == 2 and all(c["choices"][0]["text"] == "" for c in marks)


def test_metrics_count_accepted_tokens_per_draft_position():
    """Usage adds each generation's per-position counts, a longer list padding the shorter."""
    u = Usage()
    u.add(10, 0, 0.1, 8, 0.2, DraftCounts(9, 5, 3, (3, 2, 0)))
    u.add(10, 4, 0.1, 1, 0.0, DraftCounts(4, 1, 1, (1, 0, 0, 0)))
    assert u.accepted_at == (4, 2, 0, 0) and u.accepted == 6 == sum(u.accepted_at)
    assert u.predicted_steps == 7 and u.predicted_tokens == 9


def test_responses_stream_with_timings_per_token_and_progress(running):
    """/v1/responses as llama-server streams it: the last event carries the answer's timings, each
    delta the timings so far with timings_per_token, and return_progress adds response.in_progress
    events with prompt_progress (before the prompt is read and at its end) before the message's
    output item is added."""
    body = {"model": "tiny:1", "input": "Hi there", "max_output_tokens": 5, "stream": True}
    blocks = running.request("/v1/responses", {**body, "timings_per_token": True, "return_progress": True})[1]
    events = [json.loads(b.split("\n")[1][len("data: "):]) for b in blocks.decode().strip().split("\n\n")]
    final = events[-1]
    assert final["type"] == "response.incomplete" and final["timings"]["predicted_n"] == 5
    progress = [e for e in events if "prompt_progress" in e]
    total = final["response"]["usage"]["input_tokens"]
    assert [e["type"] for e in progress] == ["response.in_progress"] * 2
    assert progress[-1]["prompt_progress"]["processed"] == total and "timings" in progress[0]
    types = [e["type"] for e in events]  # llama-server's order: the progress before the message's item opens
    assert types[:6] == ["response.created", "response.in_progress", "response.in_progress", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[6] == "response.output_text.delta" and [e["sequence_number"] for e in events] == list(range(len(events)))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    made = [e["timings"]["predicted_n"] for e in deltas]
    assert made == sorted(made) and made[-1] == 5
    plain = running.request("/v1/responses", body)[1].decode()
    assert plain.count('"timings"') == 1 and "prompt_progress" not in plain  # the last event's alone
