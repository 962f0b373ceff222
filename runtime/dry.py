"""DRY ("don't repeat yourself"): llama.cpp's repetition penalty on the token that would make a
repeated run longer (src/llama-sampler.cpp's llama_sampler_dry, from koboldcpp).

Over the last dry_penalty_last_n generated tokens (-1: all of them), a token that would extend a
run which already appeared earlier, the run at least dry_allowed_length long, has
dry_multiplier x dry_base ^ (length - dry_allowed_length) taken from its logit. A sequence
breaker (by default a newline, ':', '"' and '*') ends a run: the vocabulary's tokens that hold
one, or end with its start (with the tokens of the rest after them), are found once per
tokenizer and breakers (`breakers`), as llama.cpp's get_overlapping_token_sequences finds them.
"""

from __future__ import annotations

import math
from typing import Any

from .json_format import piece_bytes

MAX_BREAKER_BYTES = 40  # llama.cpp's MAX_CHAR_LEN: a longer breaker is cut
MAX_TAIL_TOKENS = 20  # its MAX_SEQ_LEN: a breaker's tail tokens kept
FLOAT_MAX_LOG = 88.7228391  # log of float32's largest: the exponent's cap
DEFAULT_BREAKERS = ("\n", ":", '"', "*")

Breakers = dict[int, tuple[tuple[int, ...], ...]]  # head token -> the tails after it (empty: the head alone)
_CACHE: dict[tuple[int, tuple[str, ...]], tuple[Any, Breakers]] = {}


def _vocabulary(tokenizer: Any) -> list[bytes]:
    """Each token's bytes as llama.cpp's detokenize(id, special=true) gives them: byte-level text
    as its bytes, an added token's text as UTF-8."""
    out: list[bytes] = [b""] * tokenizer.get_vocab_size(with_added_tokens=True)
    for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i < len(out):
            out[i] = piece_bytes(text) or text.encode()
    for i, added in tokenizer.get_added_tokens_decoder().items():
        if i < len(out):
            out[i] = added.content.encode()
    return out


def _find_breakers(tokenizer: Any, breakers: tuple[str, ...]) -> Breakers:
    found: dict[int, list[tuple[int, ...]]] = {}
    words = _vocabulary(tokenizer)
    for breaker in breakers:
        s = breaker.encode()[:MAX_BREAKER_BYTES]
        if not s:
            continue
        for token, word in enumerate(words):
            if s in word:
                found.setdefault(token, []).append(())
                continue
            pos = word.find(s[:1])
            while pos != -1:  # the word's end matches the breaker's start: the rest's tokens follow
                rest = len(word) - pos
                if word[pos:] == s[:rest]:
                    tail = s[rest:].decode(errors="ignore")
                    ids = tuple(tokenizer.encode(tail, add_special_tokens=False).ids[:MAX_TAIL_TOKENS])
                    if ids not in found.setdefault(token, []):
                        found[token].append(ids)
                pos = word.find(s[:1], pos + 1)
    return {token: tuple(tails) for token, tails in found.items()}


def breakers(tokenizer: Any, sequence_breakers: tuple[str, ...]) -> Breakers:
    """The processed breakers of a tokenizer (made once per tokenizer and breakers: ~1 s)."""
    key = (id(tokenizer), sequence_breakers)
    if key not in _CACHE or _CACHE[key][0] is not tokenizer:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (tokenizer, _find_breakers(tokenizer, sequence_breakers))
    return _CACHE[key][1]


def _repeat_limit(rat: Any, n: int, found: Breakers) -> int:
    """How far back a run may reach: to the most recent complete breaker (llama.cpp's step 1)."""
    for i in range(n):
        tails = found.get(rat(i))
        if tails is None:
            continue
        longest = -1
        for tail in tails:
            if longest < len(tail) <= i and all(tail[o] == rat(i - o - 1) for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            return i - longest
    return n


def _repeat_counts(rat: Any, n: int, limit: int) -> list[int]:
    """counts[n - 1 - k]: how many of the last tokens also end k tokens earlier, at most `limit`
    (llama.cpp's reverse Z-algorithm, step 2)."""
    counts = [0] * n
    last, lt, rt = n - 1, 0, 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat(m) == rat(m + k):
                m += 1
            counts[last - k] = min(m, limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p, right = k - lt, rt - k + 1
            if counts[last - p] < right:
                counts[last - k] = min(counts[last - p], limit)
            else:
                i = rt + 1
                while i < n and rat(i) == rat(i - k):
                    i += 1
                counts[last - k] = min(i - k, limit)
                lt, rt = k, i - 1
    return counts


def dry_penalties(history: list[int], multiplier: float, base: float, allowed: int, last_n: int,
                  found: Breakers) -> dict[int, float]:
    """{token: what DRY takes from its logit} after `history` (the generated tokens)."""
    if multiplier == 0 or base < 1 or last_n == 0:
        return {}
    tokens = history if last_n < 0 else history[-last_n:]
    n = len(tokens)
    if n <= allowed:
        return {}

    def rat(i: int) -> int:  # the i-th token from the end
        return tokens[n - 1 - i]

    limit = _repeat_limit(rat, n, found)
    if limit < allowed:
        return {}
    counts = _repeat_counts(rat, n, limit)
    longest: dict[int, int] = {}
    for i in range(n - 1):
        if counts[i] >= allowed:
            token = rat(n - 2 - i)  # the token after a repeat of the end: it would extend it
            longest[token] = max(longest.get(token, -1), counts[i])
    cap = int(FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    out = {}
    for token, length in longest.items():
        if () in found.get(token, ()):  # a breaker on its own is never penalized
            continue
        exponent = length - allowed
        if cap > 0 and exponent > cap:
            exponent = cap
        out[token] = multiplier * base ** exponent
    return out
