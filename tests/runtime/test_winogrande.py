"""`qvl perplexity --winogrande` (runtime/winogrande.py): llama.cpp's CSV reading (its quotes, the
lines it leaves out, the file's last line among them), its draw of the tasks (the indices below
are what g++ 12 printed for its loop: std::mt19937 rng(1), float scale = 1/(1.f + rng.max()),
j = int(scale*rng()*aux.size()), aux[j] = aux.back()), each choice's score equal to one computed
from transformers' log-probabilities by llama.cpp's rule (float32 both sides: within 1e-5 nats,
measured 8.3e-7), its FIXME kept, and the command's lines and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime.loader import load
from qvl.runtime.task_scoring import TaskError
from qvl.runtime.winogrande import Scored, Task, parse_tasks, score_task, select
from tiny_models import TinySpec, build_model, make_checkpoint, to_gguf

SPEC = TinySpec(dtype=torch.float32, seed=13)
SCORE_TOL = 1e-5  # nats: the same float32 math in another order (test_perplexity.py's NLL_TOL)
CSV = "\n".join([
    "index,sentence,option1,option2,answer",
    "0,The trophy does not fit into the brown suitcase because the _ is too large for it.,trophy,suitcase,1",
    '1,"She gave the book, the pen and the cup to _.",Mary,John,2',
    "2,this line has no blank,a,b,1",
    "3,too, few commas",
    "4,The cat sat on the _ all day long in the sun.,mat,roof,3",
    '5,"Tom said ""hi"", then _ left the room quietly and slowly.",he,she,2 ',
    "6,The last line is never read: _.,a,b,1",
]) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("winogrande")
    return to_gguf(make_checkpoint(d / "ckpt", SPEC), d / "m.gguf", "f32", "f32")


def test_the_csv_as_llama_cpp_reads_it():
    tasks, skipped = parse_tasks(CSV)
    assert skipped == 4  # the header (its answer is no number), no _, three commas, answer 3
    assert tasks[0] == Task("The trophy does not fit into the brown suitcase because the ", " is too large for it.",
                            ("trophy", "suitcase"), 1)
    assert tasks[1] == Task("She gave the book, the pen and the cup to ", ".", ("Mary", "John"), 2)
    # quotes stripped from the sentence's ends only; the answer read as a leading integer
    assert tasks[2] == Task('Tom said ""hi"", then ', " left the room quietly and slowly.", ("he", "she"), 2)
    assert len(tasks) == 3  # the last line is not read (llama-perplexity's -f and getline)
    with pytest.raises(TaskError, match="no task in 1 lines"):
        parse_tasks("a,b\nc\n")


def test_select_draws_as_llama_perplexity():
    """g++ printed the first 20 of 50: 20 48 34 43 0 5 13 42 6 9 3 15 7 14 12 23 46 30 17 26; of
    1267 (WinoGrande's debiased eval): 528 1262 911 1178 0 161 381 1258 184 296 ..."""
    for total, want in ((50, [20, 48, 34, 43, 0, 5, 13, 42, 6, 9, 3, 15, 7, 14, 12, 23, 46, 30, 17, 26]),
                        (1267, [528, 1262, 911, 1178, 0, 161, 381, 1258, 184, 296])):
        tasks = [Task(str(i), "", ("a", "b"), 1) for i in range(total)]
        assert [int(t.first) for t in select(tasks, len(want))] == want
    assert select(tasks, 0) == tasks and select(tasks, 5000) == tasks  # 0 or more than there are: all, in order


def test_a_tie_is_choice_two():
    assert Scored(Task("", "", ("a", "b"), 1), (-1.0, -1.0)).picked == 2
    assert Scored(Task("", "", ("a", "b"), 1), (-1.0, -1.5)).picked == 1


def _reference(model, reference, task: Task) -> list[float]:
    """llama.cpp's rule on transformers' log-probabilities of each whole sentence."""
    def ids(text: str) -> list[int]:
        return model.tokenizer.encode(text, add_special_tokens=False).ids

    seqs = [ids(task.first + c + task.second) for c in task.choices]
    common = next(i for i in range(min(map(len, seqs))) if seqs[0][i] != seqs[1][i])
    with torch.no_grad():
        lps = [torch.log_softmax(reference(input_ids=torch.tensor([s])).logits[0].double(), -1) for s in seqs]
    skip = all(len(s) - common > 3 for s in seqs)
    out = []
    for k, s in enumerate(seqs):
        base = len(ids(task.first + task.choices[k])) if skip else common
        last = 1 if len(s) - base > 1 else 0
        values = []
        for j in range(base - 1, len(s) - 1 - last):
            row = lps[0][len(seqs[0]) - 1] if k == 1 and j == common - 1 else lps[k][j]  # llama.cpp's FIXME
            values.append(float(row[s[j + 1]]))
        out.append(sum(values) / len(values))
    return out


def test_scores_equal_llama_cpps_rule_on_transformers(tiny):
    """Task 0 continues past both choices (only the tokens after each are scored); task 1 ends
    two tokens after them (each scored whole, choice 2's first token from choice 1's last row)."""
    model = load(tiny, device="cpu")
    reference = build_model(SPEC).float().eval()
    tasks, _ = parse_tasks(CSV)
    for task in tasks:
        got, want = score_task(model, task), _reference(model, reference, task)
        assert max(abs(a - b) for a, b in zip(got.scores, want)) <= SCORE_TOL, (got.scores, want)


def test_the_command(tiny, tmp_path):
    path = tmp_path / "wino.csv"
    path.write_text(CSV, encoding="utf-8")
    runner = CliRunner()
    r = runner.invoke(app, ["perplexity", str(tiny), "-f", str(path), "--winogrande", "--cpu"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip("\n").split("\n")
    assert len(lines) == 5 and lines[3] == "" and lines[4].startswith("Final Winogrande score(3 tasks): ")
    first = lines[0].split("\t")
    assert first[0] == "1" and first[1] in ("0.0000", "100.0000") and first[2].split()[-1] == "1"
    j = runner.invoke(app, ["perplexity", str(tiny), "-f", str(path), "--winogrande", "--cpu", "--json",
                            "--winogrande-tasks", "2"])
    assert j.exit_code == 0, j.output
    d = json.loads(j.stdout)
    assert d["tasks"] == 2 and len(d["scores"]) == 2
    assert d["score"] == 100 * sum(p == a for p, a in zip(d["picked"], d["answer"])) / 2
    bad = tmp_path / "bad.csv"
    bad.write_text("nothing,here\n", encoding="utf-8")
    for args, expect in ((["-f", str(bad), "--winogrande"], "no task in 0 lines"),
                         (["-f", str(path), "--winogrande", "--hellaswag"], "one at a time"),
                         (["-f", str(path), "--winogrande", "--winogrande-tasks", "-1"], "0 (all) or more")):
        r = runner.invoke(app, ["perplexity", str(tiny), "--cpu", *args])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.output
