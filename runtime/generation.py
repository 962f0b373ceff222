"""A finished answer: what Model.generate returns (or a stream's last item) and `last_generation` keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .logprobs import TokenLogprob
from .video import VideoInput


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds; with --spec-type, llama-server's draft counts
    videos: list[VideoInput] = field(default_factory=list)  # what was sampled, for --verbose
    reused_tokens: int = 0  # prompt tokens the last generation's cache already held (prompt_cache.py)
    ended: bool = False  # an end-of-turn token ended it (else the token limit or the context did)
    logprobs: list[TokenLogprob] | None = None  # each token's, with `logprobs=` (logprobs.py)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) each picture was seen at


def answer_timings(out: Generation, load_s: float) -> dict[str, float]:
    """--json's and --verbose's figures of an answer: seconds, and prefill / decode tokens a second."""
    timings = {"load_s": round(load_s, 3), **{k: round(v, 3) for k, v in out.timings.items()}}
    if out.timings.get("prefill_s"):
        timings["prefill_tok_s"] = round(out.prompt_tokens / out.timings["prefill_s"], 2)
    if out.token_ids and out.timings.get("decode_s"):
        timings["decode_tok_s"] = round(len(out.token_ids) / out.timings["decode_s"], 2)
    return timings


def answer_json(out: Generation, timings: dict[str, float]) -> dict[str, Any]:
    """--json's object of an answer: text, token ids, prompt tokens, done_reason, timings (and logprobs)."""
    reply: dict[str, Any] = {"text": out.text, "token_ids": out.token_ids, "prompt_tokens": out.prompt_tokens,
                             "reused_tokens": out.reused_tokens, "done_reason": "stop" if out.ended else "length",
                             "timings": timings}
    if out.logprobs is not None:
        reply["logprobs"] = [{"token": t.token, "logprob": t.logprob, "top": [[i, v] for i, v in t.top]}
                             for t in out.logprobs]
    return reply


def llama_timings(g: Generation, elapsed_s: float = 0.0) -> dict[str, Any]:
    """llama-server's `timings` of an answer (its /completion's, and its OpenAI replies' last
    chunk's): prompt tokens the cache held, those read and their ms, tokens made and their ms, and
    with --spec-type the draft tokens and those taken. `elapsed_s`: seconds since the request
    began, whose part after the prompt counts as decoding where the answer took no decode time
    of its own (it failed before one was taken)."""
    prompt_s = g.timings.get("prefill_s", 0.0) + g.timings.get("vision_ms", 0.0) / 1e3
    decode_s = g.timings.get("decode_s", max(elapsed_s - prompt_s, 0.0))
    n, m = g.prompt_tokens - g.reused_tokens, len(g.token_ids)
    return {"cache_n": g.reused_tokens, "prompt_n": n, "prompt_ms": prompt_s * 1e3,
            "prompt_per_token_ms": prompt_s * 1e3 / n if n else 0.0,
            "prompt_per_second": n / prompt_s if prompt_s else 0.0,
            "predicted_n": m, "predicted_ms": decode_s * 1e3,
            "predicted_per_token_ms": decode_s * 1e3 / m if m else 0.0,
            "predicted_per_second": m / decode_s if decode_s else 0.0,
            **{k: int(v) for k, v in g.timings.items() if k.startswith("draft_n")}}
