"""A generation while it runs, as llama-server reports one before its end: `timings` on each
streamed chunk (a request's `timings_per_token`) and `prompt_progress` while the prompt is read
(`return_progress`). Model.live is the running generation's; its stream yields PromptProgress
items among its text pieces when asked (Model.generate's `progress`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .generation import server_timings

PROGRESS_TOKENS = 2048  # prompt tokens read between two progress reports: llama-server's default batch (-b)


def asks_progress(body: dict[str, Any]) -> bool:
    """A request's llama-server `return_progress`, on a stream (a whole reply has no place for it)."""
    return bool(body.get("stream", False)) and bool(body.get("return_progress"))


@dataclass(frozen=True)
class PromptProgress:
    """llama-server's prompt_progress: the prompt's tokens, those the KV cache held, those read so
    far (the cache's included) and the milliseconds since the request began."""

    total: int
    cache: int
    processed: int
    time_ms: int

    def to_json(self) -> dict[str, int]:
        return {"total": self.total, "cache": self.cache, "processed": self.processed, "time_ms": self.time_ms}


@dataclass
class Live:
    """The running generation: prompt tokens and those the cache held, the answer's ids so far
    (the list the generation appends to), when it began, how far its prompt is read and when the
    last pass over it ended, when its last token was chosen, and its drafts (speculative.Drafts)."""

    n_prompt: int = 0
    ids: list[int] = field(default_factory=list)
    cached: int = 0
    t0: float = 0.0
    processed: int = 0
    t_prompt: float | None = None
    t_last: float | None = None
    drafts: Any = None

    def __post_init__(self) -> None:
        self.processed = self.cached

    def progress(self, processed: int, now: float | None = None) -> PromptProgress:
        """The prompt read up to `processed` tokens (the cache's included), at `now` (perf_counter)."""
        now = time.perf_counter() if now is None else now
        if processed > self.processed:
            self.processed, self.t_prompt = processed, now
        return PromptProgress(self.n_prompt, self.cached, self.processed, int((now - self.t0) * 1e3))

    def chose(self) -> None:
        """A token was chosen (appended to `ids`) now."""
        self.t_last = time.perf_counter()

    def answer_s(self) -> float:
        """Seconds from the prompt's end to the last token chosen (0 before one)."""
        return self.t_last - self.t_prompt if self.t_last is not None and self.t_prompt is not None else 0.0

    def timings(self) -> dict[str, Any]:
        """llama-server's `timings` so far: the prompt's tokens read and the milliseconds until the
        last pass over them ended (0 before), the tokens chosen and the milliseconds from the
        prompt's end to the last of them."""
        prompt_s = self.t_prompt - self.t0 if self.t_prompt is not None else 0.0
        drafts = self.drafts.timings() if self.drafts is not None else {}
        return server_timings(self.cached, self.processed - self.cached, prompt_s, len(self.ids), self.answer_s(),
                              drafts)
