"""--spec-type ngram-mod (runtime/ngram_mod.py), ngram-map-k / -k4v (runtime/ngram_map.py) and
several drafters at once (speculative.Drafter):
the drafts llama.cpp's own speculative decoding makes over whole sessions of answers
(scripts/build_spec_sessions.py), the table's own rules, and answers that keep their tokens."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from qvl.runtime.ngram_mod import SLOTS, NgramMod
from qvl.runtime.speculative import Drafter, Speculation, SpeculationError, speculation

SESSIONS = Path(__file__).with_name("llamacpp-spec-sessions.json.gz")


def _prompt(prompt: list[int] | dict) -> np.ndarray:
    if isinstance(prompt, dict):
        n, mul, add, mod = prompt["synthetic"]
        return (np.arange(n, dtype=np.int64) * mul + add) % mod
    return np.array(prompt, np.int64)


def replay(case: dict, drafter: Drafter) -> list[list[int]]:
    """The driver's loop (scripts/build_spec_sessions.py) with qvl's Drafter: a draft taken as far
    as it agrees with the fixed answer, the count taken given before the next draft."""
    spec = Speculation(case["size_n"], case["size_m"], case["cap"], tuple(case["types"]), case["n_match"],
                       case["mod_n_max"], case["n_min"], tuple(case["map_k"]), tuple(case["map_k4v"]))
    drafts: list[list[int]] = []
    for request in case["requests"]:
        history, answer = _prompt(request["prompt"]), request["answer"]
        drafter.begin(spec, history)
        pos = 0
        while pos + 1 < len(answer):
            most, k = min(spec.n_max, len(answer) - pos - 2), 0
            if most > 0:
                draft = drafter.draft(spec, history, answer[pos], spec.n_max, most)
                drafts.append(draft)
                while k < len(draft) and draft[k] == answer[pos + 1 + k]:
                    drafter.took()
                    k += 1
            history = np.append(history, answer[pos:pos + k + 1])
            pos += k + 1
    return drafts


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    with gzip.open(SESSIONS, "rt") as f:
        return json.load(f)


def test_sessions_draft_as_llamacpp(cases):
    """92 sessions of 2-3 answers each (20363 draft calls, 4788 drafts): every draft llama.cpp's
    common_speculative made, table kept across a session's answers."""
    assert len(cases) == 92 and sum(len(c["drafts"]) for c in cases) == 20363
    for i, case in enumerate(cases):
        got = replay(case, Drafter())
        assert len(got) == len(case["drafts"]), i
        for j, (mine, theirs) in enumerate(zip(got, case["drafts"])):
            assert mine == theirs, (i, j, case["types"], case["n_match"])


def test_sessions_cover_what_they_claim(cases):
    """The oracle holds what it is meant to test: drafts of both kinds, refused ones, answers drafted
    from an earlier answer alone, and the resets."""
    mod_only = [c for c in cases if c["types"] == ["ngram-mod"]]
    assert sum(1 for c in mod_only for d in c["drafts"] if d) > 500
    both = [c for c in cases if len(c["types"]) == 2]
    assert sum(1 for c in both for d in c["drafts"] if d) > 100
    for kind in ("ngram-map-k", "ngram-map-k4v"):
        assert sum(1 for c in cases if c["types"] == [kind] for d in c["drafts"] if d) > 250, kind
    resets = []
    real_reset = NgramMod.reset

    def counted(self):
        resets.append(self.used)
        real_reset(self)

    NgramMod.reset = counted
    try:
        for case in mod_only:
            replay(case, Drafter())
    finally:
        NgramMod.reset = real_reset
    assert sum(1 for r in resets if r > SLOTS // 4) == 2  # the 1.5M-token prompts
    assert sum(1 for r in resets if r <= SLOTS // 4) >= 5  # streaks of refused drafts


def test_table_outlives_an_answer():
    """A sentence of one answer is drafted in the next, whose text never held it: ngram-mod's table
    does, ngram-simple cannot; a fresh Drafter (qvl-run's next process) knows nothing."""
    rng = np.random.default_rng(3)
    sentence = rng.integers(100, 5000, 60).tolist()
    kept = Drafter()
    first = {"prompt": rng.integers(100, 5000, 20).tolist(), "answer": sentence + sentence[:5]}
    second = {"prompt": rng.integers(100, 5000, 20).tolist(), "answer": sentence}
    case = {"size_n": 12, "size_m": 48, "cap": 4, "types": ["ngram-mod"], "n_match": 8, "mod_n_max": 64,
            "n_min": 1, "map_k": [12, 48, 1], "map_k4v": [12, 48, 1], "requests": [first, second]}
    both = replay(case, kept)
    alone = replay({**case, "requests": [second]}, Drafter())
    second_drafts = both[len(both) - len(alone):]
    assert sum(len(d) for d in second_drafts) >= 30 and not any(alone)  # the n-grams the chunks put in


def test_add_keeps_the_last_ngram_and_counts_slots():
    """Within one batch of n-grams the later one wins a slot, as sequential writes leave it."""
    table = NgramMod(1)
    table.begin(np.array([5, 1, 5, 2, 5, 3], np.int64))
    assert table._get([5]) == 3 and table._get([1]) == 5 and table._get([2]) == 5 and table.used == 3
    assert table.i_last == 5
    assert table.draft(np.array([7, 5], np.int64), 1, 3, 3) == []  # 1 -> 5 -> 3 -> nothing: short of n_min
    assert table.draft(np.array([7, 5], np.int64), 1, 3, 2) == [5, 3] and table.n_draft_last == 2


def test_chain_and_n_min():
    table = NgramMod(2)
    table.begin(np.array([1, 2, 3, 4, 5, 9, 9], np.int64))
    assert table.draft(np.array([8, 1], np.int64), 2, 3, 0) == [3, 4, 5]
    assert table.draft(np.array([8, 1], np.int64), 2, 5, 3) == [3, 4, 5, 9, 9]  # (4, 5) -> 9, (5, 9) -> 9
    assert table.draft(np.array([8, 1], np.int64), 2, 9, 8) == []  # (9, 9) is not there: ends before n_min
    assert table.n_draft_last == 0
    assert table.draft(np.array([8, 3], np.int64), 2, 4, 0) == []  # (3, 2) never seen


def test_refused_streak_empties_the_table():
    table = NgramMod(1)
    table.begin(np.array([1, 2, 3], np.int64))
    for _ in range(4):
        assert table.draft(np.array([1], np.int64), 1, 2, 0) == [2, 3]
        table.accept(0)
    assert table.used == 2 and table.n_low == 4
    table.draft(np.array([1], np.int64), 1, 2, 0)
    table.accept(1)  # half taken: the streak ends
    assert table.n_low == 0
    for _ in range(5):
        table.draft(np.array([1], np.int64), 1, 2, 0)
        table.accept(0)
    assert table.used == 0 and table.n_low == 0 and table.i_last == 0


def test_flags():
    assert speculation("ngram-mod") == Speculation(types=("ngram-mod",))
    assert speculation("ngram-mod,ngram-simple", mod_n_match=3).types == ("ngram-simple", "ngram-mod")
    assert speculation("ngram-mod", 12, 48, None, 16, 8, 2) == Speculation(12, 48, None, ("ngram-mod",), 16, 8, 2)
    for bad in (lambda: speculation("ngram-mod", mod_n_match=0), lambda: speculation("ngram-mod", mod_n_max=1025),
                lambda: speculation("ngram-mod", mod_n_min=-1), lambda: Speculation(types=("ngram-cache",)),
                lambda: Speculation(types=()), lambda: speculation("ngram-cache")):
        with pytest.raises(SpeculationError):
            bad()
    with pytest.raises(SpeculationError, match="--spec-ngram-mod-n-match 0: 1 to 1024"):
        speculation("ngram-mod", mod_n_match=0)
    assert speculation("ngram-map-k4v,ngram-map-k", map_k=(2, 3, 1)) == Speculation(
        types=("ngram-map-k", "ngram-map-k4v"), map_k=(2, 3, 1))
    for flags, says in (({"map_k": (0, 48, 1)}, "--spec-ngram-map-k-size-n 0: 1 to 1024"),
                        ({"map_k4v": (12, 1025, 1)}, "--spec-ngram-map-k4v-size-m 1025: 1 to 1024"),
                        ({"map_k4v": (12, 48, 0)}, "--spec-ngram-map-k4v-min-hits 0: 1 to 65535")):
        with pytest.raises(SpeculationError, match=says):
            speculation("ngram-map-k", **flags)


def test_window_hashes_are_llamacpps_wraparound_hashes():
    """window_hashes' low bits equal those of llama.cpp's hashes in their own widths: ngram-mod's
    64-bit common_ngram_mod::idx and ngram-map's 32-bit common_ngram_map_hash (whose value the
    session oracle sees only through collisions)."""
    from qvl.runtime.ngram_map import HASH_SLOTS, LCG_FACTOR
    from qvl.runtime.ngram_mod import HASH_FACTOR, window_hashes

    tokens = np.random.default_rng(5).integers(0, 152064, 400)
    starts = np.arange(0, 370, 7)
    kinds = [(24, HASH_FACTOR, 64, SLOTS), (12, LCG_FACTOR, 32, HASH_SLOTS), (1, LCG_FACTOR, 32, HASH_SLOTS)]
    for n, factor, bits, slots in kinds:
        want = []
        for s in starts:
            h = 0
            for t in tokens[s:s + n]:
                h = (h * factor + int(t)) % 2 ** bits
            want.append(h % slots)
        assert window_hashes(tokens, starts, n, factor, slots).tolist() == want
