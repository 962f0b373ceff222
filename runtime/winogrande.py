"""WinoGrande's score as llama-perplexity's --winogrande computes it.

The file is llama.cpp's CSV (e.g. ikawrakow/winogrande-eval-for-llama.cpp's): a line a task,
`index,sentence,choice 1,choice 2,answer`, the sentence's `_` where a choice goes (the sentence may
be quoted; commas inside quotes are not separators); a line it cannot read is left out, as
llama.cpp leaves it, and so is the file's last line (llama-perplexity's -f drops the file's last
newline, and its getline loop then stops before the line that newline ended). With `tasks` fewer than the file's, llama.cpp's draw: std::mt19937 seeded with 1, each
index float(word) * 2^-32 * float(left) in float32, the drawn one swapped with the last.

A task is the sentence with each choice in it ("first" + choice + "second"), tokenized whole.
Where both continue more than 3 tokens past their shared first tokens, each is scored over the
tokens after "first + choice" (the part the choice should make likely); otherwise over all of its
own. Either way the last token is left out where more than one would be scored, and the score is
the mean log-probability; choice 1 wins where its score is higher, else choice 2. As llama.cpp
(its FIXME): where the choices are scored whole, choice 2's first token is scored from the
logits after choice 1's last token, not after the shared ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model import Model
from .task_scoring import TaskError, choices_log_probs, common_prefix, score_all, swap_draws

MIN_TRAILING = 3  # llama.cpp's k_min_trailing_ctx


@dataclass(frozen=True)
class Task:
    first: str
    second: str
    choices: tuple[str, str]
    answer: int  # 1 or 2


@dataclass(frozen=True)
class Scored:
    task: Task
    scores: tuple[float, float]

    @property
    def picked(self) -> int:
        return 1 if self.scores[0] > self.scores[1] else 2

    @property
    def right(self) -> bool:
        return self.picked == self.task.answer


def _commas(line: str) -> list[int]:
    """The first four commas outside quotes."""
    found, quoted = [], False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            found.append(i)
            if len(found) == 4:
                break
    return found


def parse_tasks(text: str) -> tuple[list[Task], int]:
    """(the tasks, the lines left out) as load_winogrande_from_csv reads them."""
    # llama.cpp's -f drops the file's last newline; its getline loop stops at a line that ends
    # without one: the file's last line is never read
    lines = text.removesuffix("\n").split("\n")[:-1]
    tasks, skipped = [], 0
    for line in lines:
        c = _commas(line)
        answer = re.match(r"\s*([+-]?\d+)", line[c[3] + 1:]) if len(c) == 4 else None
        sentence = ""
        if len(c) == 4:
            quoted = c[0] + 1 < len(line) and line[c[0] + 1] == '"'
            sentence = line[c[0] + 2:c[1] - 1] if quoted else line[c[0] + 1:c[1]]
        if answer is None or int(answer.group(1)) not in (1, 2) or "_" not in sentence:
            skipped += 1
            continue
        where = sentence.index("_")
        tasks.append(Task(sentence[:where], sentence[where + 1:], (line[c[1] + 1:c[2]], line[c[2] + 1:c[3]]),
                          int(answer.group(1))))
    if not tasks:
        raise TaskError(f"no task in {len(lines)} lines (the last is never read): a WinoGrande CSV has "
                        "lines of index,sentence with _,choice 1,choice 2,answer (1 or 2)")
    return tasks, skipped


def select(tasks: list[Task], n: int) -> list[Task]:
    """llama-perplexity's pick of n tasks when n is fewer than all (all, in order, otherwise)."""
    return list(tasks) if n <= 0 or n >= len(tasks) else [tasks[i] for i in swap_draws(len(tasks), n)]


def score_task(model: Model, task: Task) -> Scored:
    """Both choices' scores, from llama.cpp's rows: the shared tokens' last, then each choice's own."""
    def ids(text: str) -> list[int]:
        return model.tokenizer.encode(text, add_special_tokens=False).ids

    seqs = [ids(task.first + c + task.second) for c in task.choices]
    common = common_prefix(seqs)
    if common == 0 or max(map(len, seqs)) > model.cfg.context_length:
        raise TaskError(f"task {(task.first + '_' + task.second)[:40]!r}: its sentences share no first token"
                        " or are longer than the model reads")
    skip_choice = all(len(s) - common > MIN_TRAILING for s in seqs)
    first, own = choices_log_probs(model, seqs, common)
    flat = torch.cat([first, *own])  # llama.cpp's rows: the shared last, choice 1's, choice 2's
    scores = []
    for k, s in enumerate(seqs):
        base = len(ids(task.first + task.choices[k])) if skip_choice else common
        last = 1 if len(s) - base > 1 else 0
        row = base - common + (len(seqs[0]) - common if k == 1 else 0)
        positions = range(base - 1, len(s) - 1 - last)
        if base < common or not positions:
            raise TaskError(f"task {(task.first + '_' + task.second)[:40]!r}: nothing of choice {k + 1} to "
                            "score")
        rows = flat[row:row + len(positions)]
        picked = rows.gather(1, torch.tensor([s[j + 1] for j in positions], device=rows.device)[:, None])
        scores.append(float(picked.double().sum()) / len(positions))
    return Scored(task, (scores[0], scores[1]))


def final_score(right: int, n: int) -> tuple[float, float]:
    """llama-perplexity's `Final Winogrande score`: the percentage right and its standard error."""
    p = right / n
    return 100 * p, 100 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


def winogrande(model: Model, tasks: list[Task], n: int,
               each: Callable[[int, Scored, int], None] | None = None) -> list[Scored]:
    """Score llama-perplexity's selection of `n` tasks (0: all); `each(i, scored, right so far)` after each."""
    return score_all(model, select(tasks, n), score_task, each)
