"""`qvl perplexity --hellaswag` (runtime/hellaswag.py): llama-perplexity's draw of the tasks (the
numbers below are what g++ 12's libstdc++ printed for std::mt19937(1) and
uniform_int_distribution<size_t>: the program is in each test's docstring), each ending's mean
log-probability equal to transformers' (float32 both sides: summation order only, within 1e-5 nats,
as test_perplexity.py's tokens; measured 3.4e-7), the pick, llama.cpp's running lines and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qvl.runtime.cli import app
from choice_reference import reference_means
from qvl.runtime.hellaswag import parse_tasks, select, uniform_below, wilson
from qvl.runtime.loader import load
from qvl.runtime.multiple_choice import Task, score_task
from qvl.runtime.llama_random import StdMt19937
from qvl.runtime.task_scoring import TaskError
from tiny_models import TinySpec, build_model, make_checkpoint, to_gguf

SPEC = TinySpec(dtype=torch.float32, seed=11)
LOGPROB_TOL = 1e-5  # nats: the same float32 math in another order (test_perplexity.py's NLL_TOL)
TASKS = [
    Task("Cooking: She cracks two eggs into the bowl and",
         ("flies to the moon.", "sings the anthem loudly.", "whisks them with a fork.", "paints the fence blue."),
         (0, 0, 1, 0)),
    Task("Sports: The runner ties his shoes, then",
         ("he starts to jog down the road.", "the cake rises.", "a cat sleeps.", "it rains on the sea."), (1, 0, 0, 0)),
    Task("Music: A man sits at the piano and", ("eats", "plays a slow song for the crowd.", "swims.", "x"),
         (0, 1, 0, 0)),
]


def _text(tasks: list[Task]) -> str:
    return "".join(f"{t.question}\n{t.labels.index(1)}\n" + "".join(e + "\n" for e in t.answers) for t in tasks)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hellaswag")
    return to_gguf(make_checkpoint(d / "ckpt", SPEC), d / "m.gguf", "f32", "f32")


def test_the_generator_and_draws_equal_libstdcxx():
    """std::mt19937 r(1); r() x 3; then uniform_int_distribution<size_t> d(0, n - 1), d(r) for n =
    10042, 7, 1, 3, 100000 on a fresh r(1); and n = 2^31 + 1, 8 draws (12 words: 4 rejected)."""
    gen = StdMt19937(1)
    assert [gen() for _ in range(3)] == [1791095845, 4282876139, 3093770124]
    gen = StdMt19937(1)
    assert [uniform_below(gen, n) for n in (10042, 7, 1, 3, 100000)] == [4187, 6, 0, 2, 11]
    gen = StdMt19937(1)
    assert [uniform_below(gen, 2**31 + 1) for _ in range(8)] == [
        895547922, 1546885062, 2002651684, 245631, 275145156, 649254245, 315155879, 851650624]


def test_select_draws_as_llama_perplexity():
    """llama-perplexity's loop: std::mt19937 rng(1); for left = 50 down to 1, d(0, left - 1)(rng)
    picks among the tasks left; g++ printed 20 48 34 43 0 5 13 42 6 9 3 15 7 14 12 23 13 30 17 26 ..."""
    draws = [20, 48, 34, 43, 0, 5, 13, 42, 6, 9, 3, 15, 7, 14, 12, 23, 13, 30, 17, 26]
    tasks = [Task(str(i), ("a", "b", "c", "d"), (1, 0, 0, 0)) for i in range(50)]
    left, want = list(tasks), []
    for d in draws:
        want.append(left.pop(d))
    assert select(tasks, 20) == want
    assert sorted(select(tasks, 400), key=lambda t: int(t.question)) == tasks  # more asked than there are: all


def test_wilson_interval_is_llama_perplexitys():
    """Lines llama-perplexity printed: '1  0.00000000%  [0.0000%, 79.3451%]', '25  40.00000000%  [23.4033%,
    59.2605%]'."""
    for right, n, want in ((0, 1, (0.0, 79.3451)), (10, 25, (23.4033, 59.2605))):
        low, high = wilson(right, n)
        assert (round(100 * low, 4), round(100 * high, 4)) == want


def test_endings_scores_equal_transformers(tiny):
    """Each ending: the mean of log p(token j+1 | tokens ..j) over its tokens after the shared ones,
    the first of them scored from the last shared token; the pick the first of the highest."""
    model = load(tiny, device="cpu")
    reference = build_model(SPEC).float().eval()
    for task in TASKS:
        got, want = score_task(model, task), reference_means(model, reference, task.question, task.answers)
        assert max(abs(a - b) for a, b in zip(got.logprobs, want)) <= LOGPROB_TOL, (got.logprobs, want)
        assert got.picked == max(range(4), key=lambda i: (want[i], -i))
    # the shared tokens' cache is reused: scoring again from a fresh model gives the same
    assert score_task(load(tiny, device="cpu"), TASKS[0]).logprobs == score_task(model, TASKS[0]).logprobs


def test_a_tie_picks_the_first(tiny):
    """Two endings alike score alike, and the first of the highest is picked (llama.cpp's strict >)."""
    twin = Task("Cooking: She cracks two eggs into the bowl and", ("whisks them.", "flies.", "whisks them.", "x"),
                (0, 0, 1, 0))
    got = score_task(load(tiny, device="cpu"), twin)
    assert got.logprobs[0] == got.logprobs[2]
    assert got.picked == max(range(4), key=lambda i: (got.logprobs[i], -i)) and got.picked != 2


def test_parse_refuses_what_is_not_six_lines_a_task():
    assert parse_tasks(_text(TASKS)) == TASKS
    for text, expect in (("a\nb\n", "2 lines: a HellaSwag file has six a task"),
                         ("ctx\n4\na\nb\nc\nd\n", "line 2: the right ending's index is 0-3, not '4'"),
                         ("", "0 lines")):
        with pytest.raises(TaskError, match=expect):
            parse_tasks(text)


def test_the_command(tiny, tmp_path):
    """llama-perplexity --hellaswag's lines (header, a running line a task) on stdout; --json's
    figures; refusals in one line, exit 2."""
    path = tmp_path / "tasks.txt"
    path.write_text(_text(TASKS), encoding="utf-8")
    runner = CliRunner()
    r = runner.invoke(app, ["perplexity", str(tiny), "-f", str(path), "--hellaswag", "--cpu"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip("\n").split("\n")
    assert lines[0] == "task\tacc_norm\t95% confidence interval" and len(lines) == 4
    j = runner.invoke(app, ["perplexity", str(tiny), "-f", str(path), "--hellaswag", "--cpu", "--json",
                            "--hellaswag-tasks", "2"])
    assert j.exit_code == 0, j.output
    d = json.loads(j.stdout)
    assert d["tasks"] == 2 and len(d["picked"]) == 2
    right = sum(p == g for p, g in zip(d["picked"], d["gold"]))
    assert d["acc_norm"] == 100 * right / 2 and lines[2].startswith(f"2\t{100 * right / 2:3.8f}%\t")
    bad = tmp_path / "bad.txt"
    bad.write_text("one\ntwo\n", encoding="utf-8")
    for args, expect in ((["-f", str(bad), "--hellaswag"], "2 lines: a HellaSwag file"),
                         (["-f", str(path), "--hellaswag", "--base", str(tiny)], "not with --base"),
                         (["-f", str(path), "--hellaswag", "--hellaswag-tasks", "0"], "--hellaswag-tasks 0")):
        r = runner.invoke(app, ["perplexity", str(tiny), "--cpu", *args])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.output
