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
