"""`qvl perplexity --multiple-choice` (runtime/multiple_choice.py): llama.cpp's binary task files
read as it reads them (in order, or drawn at their offsets as test_winogrande.py's g++ indices),
each answer's mean log-probability equal to transformers' (float32 both sides, within 1e-5 nats;
measured 2.4e-7),
llama-perplexity's final lines (their figures printed by it for 39 right of 120 tasks with 443
answers in all), and the command's lines and refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from typer.testing import CliRunner

from choice_reference import reference_means
from qvl.runtime.cli import app
from qvl.runtime.loader import load
from qvl.runtime.multiple_choice import Scored, Task, final_scores, read_tasks, score_task
from qvl.runtime.task_scoring import TaskError
from tiny_models import TinySpec, build_model, make_checkpoint, to_gguf

SPEC = TinySpec(dtype=torch.float32, seed=17)
LOGPROB_TOL = 1e-5  # nats: the same float32 math in another order (test_perplexity.py's NLL_TOL)
TASKS = [
    Task("The sky on a clear day is", ("blue.", "made of cheese and crackers."), (1, 0)),
    Task("Water boils at sea level at a temperature of", ("one hundred degrees Celsius.", "ten degrees.",
                                                          "minus forty.", "it never boils.", "a very cold one."),
         (1, 0, 0, 0, 0)),
    Task("A cat is an animal that", ("barks at the moon.", "often sleeps in the sun."), (0, 1)),
]


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


def _answers(answers: tuple[str, ...], labels: tuple[int, ...]) -> bytes:
    return (struct.pack("<I", len(answers)) + b"".join(_string(a) for a in answers)
            + struct.pack(f"<{len(labels)}i", *labels))


def _file(tasks: list[Task], mc2_label: int = 1) -> bytes:
    """llama.cpp's layout: count, offsets, then each task (question, mc1, mc2: its right answer)."""
    bodies = [_string(t.question) + _answers(t.answers, t.labels) + _answers((t.answers[0],), (mc2_label,))
              for t in tasks]
    offsets, at = [], 4 + 4 * len(tasks)
    for b in bodies:
        offsets.append(at)
        at += len(b)
    return struct.pack(f"<I{len(tasks)}I", len(tasks), *offsets) + b"".join(bodies)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("multiple_choice")
    return to_gguf(make_checkpoint(d / "ckpt", SPEC), d / "m.gguf", "f32", "f32")


def test_the_file_as_llama_cpp_reads_it():
    assert read_tasks(_file(TASKS)) == (TASKS, 3)
    assert read_tasks(_file(TASKS) + b"\n") == (TASKS, 3)  # -f's last newline is not part of it
    many = [Task(f"question {i}", ("a", "b"), (0, 1)) for i in range(50)]
    drawn, count = read_tasks(_file(many), 5)
    assert count == 50 and [t.question for t in drawn] == [f"question {i}" for i in (20, 48, 34, 43, 0)]
    with pytest.raises(TaskError, match="the file ends inside a task"):  # its last byte, 10, taken as -f's newline
        read_tasks(_file(TASKS, mc2_label=0x0A000000))
    for data, expect in ((b"", "no tasks"), (struct.pack("<I", 0), "no tasks"),
                         (_file([Task("q", ("",), (1,))]), "an empty question or answer"),
                         (_file([Task("q", ("a",) * 101, (0,) * 101)]), "101 answers to a task")):
        with pytest.raises(TaskError, match=expect):
            read_tasks(data)


def test_answers_scores_equal_transformers(tiny):
    """Two and five answers: each one's mean of log p(token j+1 | tokens ..j) after the shared tokens."""
    model = load(tiny, device="cpu")
    reference = build_model(SPEC).float().eval()
    for task in TASKS:
        got, want = score_task(model, task), reference_means(model, reference, task.question, task.answers)
        assert max(abs(a - b) for a, b in zip(got.logprobs, want)) <= LOGPROB_TOL, (got.logprobs, want)
        assert got.picked == max(range(len(want)), key=lambda i: (want[i], -i))
        assert got.right == (task.labels[got.picked] == 1)


def test_final_lines_are_llama_perplexitys():
    """llama-perplexity printed 'Final result: 32.5000 +/- 4.2936' and 'Random chance: 27.0880 +/-
    4.0739' for 39 right of 120 tasks with 443 answers in all."""
    def task(n: int, right: bool) -> Scored:
        return Scored(Task("q", ("a",) * n, (int(right),) + (0,) * (n - 1)), (0.0,), 0)

    scored = [task(4, True)] * 39 + [task(4, False)] * 62 + [task(2, False)] * 18 + [task(3, False)]
    (score, sigma), (chance, chance_sigma) = final_scores(scored)
    assert sum(len(s.task.answers) for s in scored) == 443 and sum(s.right for s in scored) == 39
    assert f"{score:.4f} +/- {sigma:.4f}" == "32.5000 +/- 4.2936"
    assert f"{chance:.4f} +/- {chance_sigma:.4f}" == "27.0880 +/- 4.0739"


def test_the_command(tiny, tmp_path):
    path = tmp_path / "mc.bin"
    path.write_bytes(_file(TASKS))
    runner = CliRunner()
    r = runner.invoke(app, ["perplexity", str(tiny), "-f", str(path), "--multiple-choice", "--cpu"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip("\n").split("\n")
    assert lines[0] == "task\tacc_norm" and [x.split("\t")[0] for x in lines[1:4]] == ["1", "2", "3"]
    assert lines[5].startswith("Final result: ") and lines[6].startswith("Random chance: 33.3333 +/- ")
    j = runner.invoke(app, ["perplexity", str(tiny), "-f", str(path), "--multiple-choice", "--cpu", "--json"])
    d = json.loads(j.stdout)
    assert d["tasks"] == 3 and lines[3] == f"3\t{100 * sum(d['right']) / 3:.8f}"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00\x00")
    for args, expect in ((["-f", str(bad), "--multiple-choice"], "no tasks"),
                         (["-f", str(tmp_path / "none.bin"), "--multiple-choice"], "No such file"),
                         (["-f", str(path), "--multiple-choice", "--winogrande"], "one at a time"),
                         (["-f", str(path), "--multiple-choice", "--multiple-choice-tasks", "-2"], "0 (all) or more")):
        r = runner.invoke(app, ["perplexity", str(tiny), "--cpu", *args])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.output
