"""`qvl serve --metrics`'s GET /metrics: llama.cpp server's Prometheus metrics, under its names
(`llamacpp:...`), so that a dashboard made for llama-server reads qvl's.

Counters (since the server started, every model it loaded): prompt_tokens_total (prompt tokens
read, those the KV cache held not counted), prompt_tokens_cached_total, prompt_seconds_total,
tokens_predicted_total, tokens_predicted_seconds_total, n_decode_total (decoder passes: a
prompt's passes of up to 512 tokens, one step a new token), n_tokens_max (the longest prompt and
answer; a token taken from a draft rode on another's pass), and the speculative-decoding
counters (`--spec-type`: draft tokens made, those taken, the passes that checked them, and once a
draft was checked spec_decode_num_accepted_tokens_per_pos_total{position="i"}: the drafts whose
token at place i was taken). Gauges: prompt_tokens_seconds and predicted_tokens_seconds (tokens a
second over the generations since the last scrape, as llama.cpp averages over that window; the
predicted rate over decode steps, each answer's first token, which its prompt's last pass gave,
not counted), requests_processing (0 or 1: qvl serve
runs one request at a time), requests_deferred (requests waiting for it), n_busy_slots_per_decode
(1 once a generation ran). A generation is counted once its prompt was read, a stream its client
left and one that failed included (llama.cpp flushes a slot's counts when it is reset), and the
texts read for embeddings as prompt tokens and passes. Without --metrics the endpoint answers 501,
as llama.cpp's does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .server import Reply, RequestError, Service

PATH = "/metrics"


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def metrics(service: Service, body: dict[str, Any]) -> Reply:
    if not service.config.metrics:
        raise RequestError(501, "This server does not support metrics endpoint. Start it with `--metrics`")
    usage = service.usage
    now, then = usage.total.copy(), usage.scraped
    usage.scraped = now
    counters = [
        ("prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens", now.prompt_tokens),
        ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache", now.cached_tokens),
        ("prompt_seconds_total", "Total time spent processing prompts", now.prompt_s),
        ("tokens_predicted_total", "Number of generation tokens processed", now.predicted_tokens),
        ("tokens_predicted_seconds_total", "Total time spent generating tokens", now.predicted_s),
        ("n_decode_total", "Total number of decoder passes (prompt passes of up to 512 tokens, one a new token)",
         now.passes),
        ("n_tokens_max", "Largest observed sequence length (prompt + generation)", now.max_tokens),
        ("spec_decode_num_draft_tokens_total", "Speculative: Total draft tokens generated", now.drafted),
        ("spec_decode_num_accepted_tokens_total", "Speculative: Total draft tokens accepted by the target model",
         now.accepted),
        ("spec_decode_num_drafts_total", "Speculative: Total speculative decoding verification steps",
         now.draft_passes),
    ]
    gauges = [
        ("prompt_tokens_seconds", "Average prompt throughput in tokens/s",
         _rate(now.prompt_tokens - then.prompt_tokens, now.prompt_s - then.prompt_s)),
        ("predicted_tokens_seconds", "Average generation throughput in tokens/s",
         _rate(now.predicted_steps - then.predicted_steps, now.predicted_s - then.predicted_s)),
        ("requests_processing", "Number of requests processing", int(usage.working)),
        ("requests_deferred", "Number of requests deferred", usage.waiting()),
        ("n_busy_slots_per_decode", "Average number of busy slots per decoder pass", 1 if now.passes else 0),
    ]
    lines = []
    for kind, items in (("counter", counters), ("gauge", gauges)):
        for name, text, value in items:
            shown = value if isinstance(value, int) else repr(float(value))
            lines += [f"# HELP llamacpp:{name} {text}", f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {shown}"]
    if now.accepted_at:  # a labelled counter: one series a draft position
        name = "llamacpp:spec_decode_num_accepted_tokens_per_pos_total"
        lines += [f"# HELP {name} Accepted tokens per draft position", f"# TYPE {name} counter"]
        lines += [f'{name}{{position="{i}"}} {n}' for i, n in enumerate(now.accepted_at)]
    return Reply("\n".join(lines) + "\n")


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {("GET", PATH): metrics}
