"""What generations have read and written: the counts llama.cpp's server keeps for its GET
/metrics (metrics_api.py). A Model counts its own generations into its `usage` (one its reader
left, or that failed, once its prompt was read), and the texts it reads for embeddings; `qvl
serve` gives every model it loads one Usage, so the counts run on through model swaps."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .decoder import PREFILL_CHUNK


@dataclass(frozen=True)
class DraftCounts:
    """A generation's --spec-type counts (speculative.Drafts): draft tokens read, those taken (each
    rode on another token's pass), the passes that read a draft, and for each place in a draft how
    many drafts had their token there taken (llama-server's accepted tokens per draft position)."""

    drafted: int = 0
    accepted: int = 0
    passes: int = 0
    at: tuple[int, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0  # prompt tokens read (those the KV cache already held not counted)
    cached_tokens: int = 0  # prompt tokens the KV cache held
    prompt_s: float = 0.0  # time reading prompts (vision encodes not counted)
    predicted_tokens: int = 0
    predicted_s: float = 0.0  # from each prompt's end to its answer's last token
    predicted_steps: int = 0  # tokens made less each answer's first, which the prompt's last pass gave
    passes: int = 0  # decoder passes: prompt passes of up to PREFILL_CHUNK tokens, one step a new token
    max_tokens: int = 0  # the longest sequence, prompt and answer
    generations: int = 0
    drafted: int = 0  # --spec-type's draft tokens, those taken, and the passes that checked them (speculative.py)
    accepted: int = 0
    draft_passes: int = 0
    accepted_at: tuple[int, ...] = ()  # drafts whose i-th token was taken, each i

    def add(self, prompt: int, cached: int, prompt_s: float, predicted: int, predicted_s: float,
            drafts: DraftCounts = DraftCounts()) -> None:
        """One finished generation: a prompt of `prompt` tokens of which `cached` came from the cache,
        `predicted` tokens made in `predicted_s` from the prompt's end to the last of them."""
        read = prompt - cached
        self.prompt_tokens += read
        self.cached_tokens += cached
        self.prompt_s += prompt_s
        self.predicted_tokens += predicted
        self.predicted_s += predicted_s
        self.predicted_steps += max(predicted - 1, 0)
        self.passes += math.ceil(read / PREFILL_CHUNK) + predicted - drafts.accepted
        self.max_tokens = max(self.max_tokens, prompt + predicted)
        self.generations += 1
        self.drafted += drafts.drafted
        self.accepted += drafts.accepted
        self.draft_passes += drafts.passes
        at = self.accepted_at + (0,) * (len(drafts.at) - len(self.accepted_at))
        self.accepted_at = tuple(n + (drafts.at[i] if i < len(drafts.at) else 0) for i, n in enumerate(at))

    def read(self, lengths: list[int], seconds: float) -> None:
        """Texts read side by side for their embeddings in one pass (one longer than PREFILL_CHUNK
        alone, in its passes): prompt tokens, none cached, nothing predicted, as llama.cpp counts
        an embedding request's batches."""
        total = sum(lengths)
        self.prompt_tokens += total
        self.prompt_s += seconds
        self.passes += math.ceil(total / PREFILL_CHUNK)
        self.max_tokens = max(self.max_tokens, *lengths)

    def copy(self) -> Usage:
        return replace(self)


@dataclass
class ServerUsage:
    """`qvl serve`'s counts for GET /metrics: every model's generations it loaded, the counts at
    the last scrape (the window its gauges average over), and the serving thread's state."""

    total: Usage = field(default_factory=Usage)
    scraped: Usage = field(default_factory=Usage)
    working: bool = False  # the serving thread runs a request
    waiting: Callable[[], int] = lambda: 0  # requests queued for it
