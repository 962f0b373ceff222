"""`qvl serve --metrics`'s GET /metrics (metrics_api.py): llama.cpp server's Prometheus counters,
counted from the generations the requests report (their usage and timings), a stream its client
left and embeddings' texts included, the gauges over the window since the last scrape; 501
without --metrics."""

from __future__ import annotations

import json
import math
import socket
import time

import pytest
from serving import MODEL, Running

from qvl.runtime.server import ServeConfig, Service


@pytest.fixture(scope="module")
def metered(store, files):
    r = Running(Service(ServeConfig(default_model=str(files / MODEL), metrics=True), store))
    yield r
    r.server.shutdown()


def _scrape(r) -> dict[str, float]:
    status, data = r.request("/metrics")
    assert status == 200
    out = {}
    lines = data.decode().splitlines()
    for line in lines:
        if not line.startswith("#"):
            name, value = line.split(" ")
            out[name.removeprefix("llamacpp:")] = float(value)
    names = [line.split(" ")[2] for line in lines if line.startswith("# TYPE")]
    assert names == [f"llamacpp:{n}" for n in out]  # each with its HELP and TYPE lines
    return out


def test_metrics_count_what_the_requests_report(metered):
    before = _scrape(metered)
    assert before["prompt_tokens_total"] == 0 and before["requests_processing"] == 0
    first = metered.json("/completion", {"prompt": "Tell me about foxes.", "n_predict": 7, "cache_prompt": True})
    second = metered.json("/completion", {"prompt": "Tell me about foxes. And owls?", "n_predict": 5})
    got = _scrape(metered)
    runs = (first, second)
    assert got["prompt_tokens_total"] == sum(r["tokens_evaluated"] - r["tokens_cached"] for r in runs)
    assert got["prompt_tokens_cached_total"] == second["tokens_cached"] > 0
    assert got["tokens_predicted_total"] == sum(r["tokens_predicted"] for r in runs) == 12
    assert got["n_tokens_max"] == max(r["tokens_evaluated"] + r["tokens_predicted"] for r in runs)
    assert got["n_decode_total"] == 2 + 12  # a prompt pass each (under 512 tokens), a step a token
    assert got["prompt_seconds_total"] > 0 and got["tokens_predicted_seconds_total"] > 0
    # from each prompt's end to its last token, as the replies' timings say
    assert got["tokens_predicted_seconds_total"] == pytest.approx(sum(r["timings"]["predicted_ms"] for r in runs) / 1e3)
    # over decode steps, as llama.cpp's: each answer's first token came from its prompt's pass
    assert got["predicted_tokens_seconds"] == pytest.approx((6 + 4) / got["tokens_predicted_seconds_total"])
    assert got["requests_deferred"] == 0 and got["n_busy_slots_per_decode"] == 1
    assert got["spec_decode_num_drafts_total"] == 0
    again = _scrape(metered)  # nothing since the last scrape: the window's rates are 0, the counters stay
    assert again["predicted_tokens_seconds"] == 0 and again["tokens_predicted_total"] == 12


def test_metrics_need_the_flag(running):
    status, data = running.request("/metrics")
    assert status == 501 and "Start it with `--metrics`" in json.loads(data)["error"]


def test_metrics_count_embeddings(metered):
    """Texts read for embeddings are prompt tokens and passes (llama.cpp counts an embedding
    request's batches), with nothing predicted: two short texts side by side are one pass, a text
    longer than a pass is read alone in its prompt passes."""
    before = _scrape(metered)
    texts = ["a fox", "an owl in the night", "a much longer text about rivers " * 120]
    got = metered.json("/api/embed", {"input": texts})
    after = _scrape(metered)
    lengths = [len(metered.service.use(None, None).model.tokenize(t, [])[0]) for t in texts]
    assert got["prompt_eval_count"] == sum(lengths) and lengths[2] > 512
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(lengths)
    assert after["n_decode_total"] - before["n_decode_total"] == 1 + math.ceil(lengths[2] / 512)
    assert after["n_tokens_max"] == max(before["n_tokens_max"], max(lengths))
    assert after["prompt_seconds_total"] > before["prompt_seconds_total"]
    assert after["tokens_predicted_total"] == before["tokens_predicted_total"]


def test_metrics_count_a_stream_its_client_left(metered):
    """A stream whose client closes the connection stops (far short of its n_predict) and what it
    read and predicted is counted, as llama.cpp flushes a slot's counts when the slot is reset."""
    before = _scrape(metered)
    host, port = metered.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Count to a million.", "n_predict": 20000, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = b""
        while seen.count(b"data: ") < 3:
            seen += sock.recv(4096)
    # the client has gone away mid-answer
    deadline = time.monotonic() + 60
    while (got := _scrape(metered))["tokens_predicted_total"] == before["tokens_predicted_total"]:
        assert time.monotonic() < deadline, "the left stream was never counted"
        time.sleep(0.05)
    assert got["requests_processing"] == 0
    assert 3 <= got["tokens_predicted_total"] - before["tokens_predicted_total"] < 20000
    assert got["prompt_tokens_total"] > before["prompt_tokens_total"]
    assert got["n_decode_total"] - before["n_decode_total"] == 1 + got["tokens_predicted_total"] - \
        before["tokens_predicted_total"]
    assert any(" 499 " in line for line in metered.log if line.startswith("POST /completion"))
