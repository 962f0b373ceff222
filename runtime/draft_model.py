"""A draft model for speculative decoding: llama.cpp's `--spec-type draft-simple` (`--spec-draft-model`).

A smaller model with the target's vocabulary (Qwen2.5-VL-3B for 7B, or a text-only Qwen2.5-0.5B)
reads the same prompt and answer as the target, at the same positions, in its own KV cache; asked
for a draft after the target sampled a token, it reads the answer tokens its cache lacks (the
sampled one last) and then guesses greedily, as llama.cpp's common_speculative_impl_draft_simple:
each guess the argmax of its logits (the first of tied ones, as qvl's greedy sampler takes: a
random-weight model's bf16 logits often tie at the top), kept while its probability among the 10
largest logits is at least `p_min` (0 by default: every guess is kept), until `n_max` guesses or the
room left; a draft shorter than `n_min` is none. The target's pass over the sampled token and the
draft decides which are taken (speculative.Drafts); the draft model's cache goes back to what the
answer took.

Pictures and videos: a draft model with a vision tower that cuts pictures as the target's does
(patch size, pixel mean and std) encodes them itself (llama.cpp's draft never does: a 3B drafting
for the 7B gets zeros there); one without reads the target's picture rows where its width is the
target's, as llama.cpp's does, else zero rows, at the same positions, so it drafts from the text
around them. The draft model keeps its cache from one answer to the
next and reads again only from where the new prompt departs from the last (pictures compared by
their pixels, as the target's prompt cache does).

Vocabularies must agree as llama.cpp requires: the same tokenizer type, begin/end tokens, sizes
within 128 and the same text for every token from id 5 on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .prompt_cache import MediaSpan

if TYPE_CHECKING:
    from .decoder import KVCache
    from .gguf_file import GGUFFile
    from .model import Model

VOCAB_SIZE_SLACK = 128  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
VOCAB_CHECK_FROM = 5  # SPEC_VOCAB_CHECK_START_TOKEN_ID
TOP_K = 10  # the draft sampler's top-k: a guess's probability is among this many


@dataclass(frozen=True)
class DraftPrompt:
    """A generation's prompt as the draft model reads it: token ids (a picture's pads each), the
    M-RoPE positions (3, n), the pictures and videos, the prompt cache's keys (pictures by their
    pixels), the answer's first position, and the target's input rows (n - embeds_from, its width)
    of the tokens from `embeds_from` on (those it read: its prompt cache held the rest)."""

    ids: list[int]
    positions: torch.Tensor
    media: list[MediaSpan]
    keys: list[int]
    answer_position: int
    embeds: torch.Tensor | None = None
    embeds_from: int = 0


def vocab_mismatch(target: GGUFFile, draft: GGUFFile) -> str | None:
    """Why `draft` cannot draft for `target` (llama.cpp's common_speculative_are_compatible), or None."""
    key = "tokenizer.ggml."
    if target.get(key + "model") != draft.get(key + "model"):
        return f"its tokenizer is {draft.get(key + 'model')!r}, the model's {target.get(key + 'model')!r}"
    for end in ("bos", "eos"):
        adds = target.get(f"{key}add_{end}_token", False), draft.get(f"{key}add_{end}_token", False)
        ids = target.get(f"{key}{end}_token_id"), draft.get(f"{key}{end}_token_id")
        if adds[0] != adds[1] or (adds[0] and ids[0] != ids[1]):
            return f"its {end} token differs from the model's ({ids[1]} vs {ids[0]})"
    mine, theirs = list(target.require(key + "tokens")), list(draft.require(key + "tokens"))
    if abs(len(mine) - len(theirs)) > VOCAB_SIZE_SLACK:
        return f"its vocabulary has {len(theirs)} tokens, the model's {len(mine)} (at most {VOCAB_SIZE_SLACK} apart)"
    for i in range(VOCAB_CHECK_FROM, min(len(mine), len(theirs))):
        if mine[i] != theirs[i]:
            return f"its token {i} is {theirs[i]!r}, the model's {mine[i]!r}"
    return None


def sees_pictures(target: Model, draft: Model) -> bool:
    """Whether the draft model's vision tower reads the pictures the target's preprocessing made."""
    a, b = target.vision_cfg, draft.vision_cfg
    return (a is not None and b is not None and draft.vision is not None
            and (a.patch_size, a.image_mean, a.image_std) == (b.patch_size, b.image_mean, b.image_std))


def load_draft(target: Model, path: str | Path, device: str, f32: bool) -> DraftModel:
    """`path` loaded (open_draft) as `target`'s draft model (draft_for)."""
    return draft_for(target, open_draft(path, device, f32))


def open_draft(path: str | Path, device: str, f32: bool) -> Model:
    """`path` (a GGUF, beside its mmproj if it has one, or a pulled model's name) loaded as a draft
    model on `device` (on a GPU: what its free memory holds; loaded before the target, the target's
    plan, KV cache included, fits what it leaves); a file that cannot be read is a ModelError that
    names it."""
    from .config import ConfigError
    from .gguf_file import GGUFError
    from .loader import load
    from .model import ModelError
    from .store import ModelName, Store, StoreError
    from .tokenizer import TokenizerError

    mmproj = None
    if not Path(path).is_file():
        try:
            ModelName.parse(str(path))
            path, mmproj = Store().resolve(str(path))
        except StoreError:
            raise ModelError(f"--spec-draft-model {path}: no such file, nor a pulled model (qvl list)") from None
    try:
        return load(path, device=device, dtype=torch.float32 if f32 else None, mmproj=mmproj)
    except (GGUFError, ConfigError, TokenizerError, KeyError) as e:
        raise ModelError(f"--spec-draft-model: {str(e).strip(chr(39) + chr(34))}") from None


def draft_for(target: Model, draft: Model) -> DraftModel:
    """`draft` as `target`'s draft model; a ModelError naming both files where its vocabulary differs."""
    from .model import ModelError

    why = vocab_mismatch(target.text_file, draft.text_file)
    if why is not None:
        raise ModelError(f"--spec-draft-model {draft.text_file.path}: cannot draft for {target.text_file.path}: {why}")
    return DraftModel(draft, sees_pictures(target, draft))


class DraftModel:
    """A draft model's state across answers: its KV cache and the keys of what it holds (the
    prompt's, then answer tokens, its own guesses past the last ones the target took)."""

    def __init__(self, model: Model, sees: bool):
        self.model, self.sees = model, sees
        self._cache: KVCache | None = None
        self._held: list[int] = []  # keys of the tokens in the cache, in order
        self._n_prompt = 0
        self._answer_position = 0

    def describe(self, target_width: int) -> str:
        """One line for --verbose: the file, its shape, what it reads in a picture's place."""
        cfg = self.model.cfg
        pictures = ("its own vision tower" if self.sees else "the model's rows" if cfg.n_embd == target_width
                    else "zero rows")
        shape = f"layers {cfg.n_layer}, width {cfg.n_embd}"
        return f"draft model {self.model.text_file.path}: {shape}; pictures: {pictures}"

    def begin(self, prompt: DraftPrompt, capacity: int) -> None:
        """Read the prompt (what the cache does not already hold of it); room for `capacity` tokens."""
        m = self.model
        reuse = 0
        for a, b in zip(self._held, prompt.keys):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(prompt.ids))
        for span in prompt.media:  # never from inside a picture
            if span.start < reuse < span.start + span.length:
                reuse = span.start
        if self._cache is None or self._cache.capacity < capacity:
            cache = m.decoder.new_cache(capacity, m.placement.kv_type)
            if reuse and self._cache is not None:
                cache.take_prefix(self._cache, reuse)
            self._cache = cache
        self._cache.length = reuse
        self._held = list(prompt.keys[:reuse])
        if reuse < len(prompt.ids):
            if self.sees:
                embeds = m._embed(prompt.ids, prompt.media, reuse)[0]
            else:  # the target's rows for the pictures where the widths agree, else zeros (llama.cpp's)
                embeds = m.decoder.embed_tokens(torch.tensor(prompt.ids[reuse:], dtype=torch.long))
                theirs, since = prompt.embeds, prompt.embeds_from
                for span in prompt.media:
                    start, stop = max(span.start, reuse), span.start + span.length
                    if stop <= start:
                        continue
                    if theirs is not None and theirs.shape[-1] == embeds.shape[-1] and start >= since:
                        embeds[start - reuse:stop - reuse] = theirs[start - since:stop - since].to(embeds)
                    else:
                        embeds[start - reuse:stop - reuse] = 0
            m._prefill_hidden(embeds, prompt.positions[:, reuse:], self._cache)
            self._held = list(prompt.keys)
        self._n_prompt = len(prompt.ids)
        self._answer_position = prompt.answer_position

    def draft(self, answer: list[int], most: int, p_min: float, n_min: int) -> list[int]:
        """A draft of at most `most` tokens after `answer` (the answer so far, its last token the
        one just sampled): llama.cpp's draft-simple."""
        assert self._cache is not None, "begin first"
        fed = self._held[self._n_prompt:]
        k = 0
        while k < min(len(fed), len(answer) - 1) and fed[k] == answer[k]:
            k += 1
        if max(answer[k:]) >= self.model.cfg.n_vocab:  # a token past its vocabulary (a bigger one's padding)
            return []
        self._cache.length = self._n_prompt + k  # a guess the target refused is written over
        del self._held[self._n_prompt + k:]
        logits = self.model._decode(self._cache, answer[k:], self._answer_position + k)[-1]
        self._held += answer[k:]
        out: list[int] = []
        while True:  # with p_min 0 (llama.cpp's default) no guess is below it: no top-k to take
            if p_min > 0 and torch.softmax(torch.topk(logits.float(), min(TOP_K, len(logits))).values, 0)[0] < p_min:
                break
            out.append(int(torch.argmax(logits)))  # the first of tied ones, as the greedy sampler's
            if len(out) >= most:
                break
            position = self._answer_position + len(self._held) - self._n_prompt
            logits = self.model._decode(self._cache, out[-1:], position)[-1]
            self._held.append(out[-1])
        return out if len(out) >= n_min else []
