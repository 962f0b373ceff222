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
    chunk's): server_timings of its prompt (pictures' encodes in) and of its tokens, from the
    prompt's end to the last token's choice (`sampled_s`). `elapsed_s`: seconds since the request
    began, whose part after the prompt counts as decoding where the answer took no decode time of
    its own (it failed before one was taken)."""
    prompt_s = g.timings.get("prefill_s", 0.0) + g.timings.get("vision_ms", 0.0) / 1e3
    decode_s = g.timings.get("sampled_s", g.timings.get("decode_s", max(elapsed_s - prompt_s, 0.0)))
    return server_timings(g.reused_tokens, g.prompt_tokens - g.reused_tokens, prompt_s, len(g.token_ids), decode_s,
                          g.timings)


def server_timings(cached: int, read: int, prompt_s: float, made: int, decode_s: float,
                   drafts: dict[str, float]) -> dict[str, Any]:
    """llama-server's `timings` (server_slot_stats::to_json): prompt tokens the cache held, those
    read and their ms, tokens made and their ms, and under --spec-type `drafts`' draft_n and
    draft_n_accepted. The rates are over decode steps, as llama.cpp's: the first token comes from
    the prompt's last pass, so one token has none (0 a token, 0 a second)."""
    steps = max(made - 1, 0)
    return {"cache_n": cached, "prompt_n": read, "prompt_ms": prompt_s * 1e3,
            "prompt_per_token_ms": prompt_s * 1e3 / read if read else 0.0,
            "prompt_per_second": read / prompt_s if prompt_s else 0.0,
            "predicted_n": made, "predicted_ms": decode_s * 1e3,
            "predicted_per_token_ms": decode_s * 1e3 / steps if steps else 0.0,
            "predicted_per_second": steps / decode_s if decode_s and steps else 0.0,
            **{k: int(v) for k, v in drafts.items() if k.startswith("draft_n")}}
