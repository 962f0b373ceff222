"""`qvl serve --metrics`'s GET /metrics (metrics_api.py): llama.cpp server's Prometheus counters,
counted from the generations the requests report (their usage and timings), the gauges over the
window since the last scrape; 501 without --metrics."""

from __future__ import annotations

import json

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
    assert got["predicted_tokens_seconds"] == pytest.approx(12 / got["tokens_predicted_seconds_total"])
    assert got["requests_deferred"] == 0 and got["n_busy_slots_per_decode"] == 1
    assert got["spec_decode_num_drafts_total"] == 0
    again = _scrape(metered)  # nothing since the last scrape: the window's rates are 0, the counters stay
    assert again["predicted_tokens_seconds"] == 0 and again["tokens_predicted_total"] == 12


def test_metrics_need_the_flag(running):
    status, data = running.request("/metrics")
    assert status == 501 and "Start it with `--metrics`" in json.loads(data)["error"]
