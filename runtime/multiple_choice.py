"""Multiple-choice scores (ARC, MMLU, TruthfulQA, HellaSwag) as llama-perplexity's
--multiple-choice computes them, from llama.cpp's binary task files (e.g.
ikawrakow/validation-datasets-for-llama.cpp's arc-easy-validation.bin).

The file, little-endian: the task count (u32), each task's byte offset (u32 each), then the tasks:
the question (u32 length, bytes), then two answer sets (mc1, one right answer; mc2, read and not
scored): the answer count (u32, at most 100), each answer (u32 length, bytes), each one's label
(i32, 1 = right). As llama-perplexity reads -f, a last byte that is a newline is not part of it.
All tasks are scored in order, or `tasks` of them drawn as llama.cpp draws them (task_scoring's
swap_draws, each read at its offset). Each answer is scored by the mean log-probability of its
tokens after those all share ("question answer", tokenized whole); the task counts when the
highest (the first of equals) is labelled 1. hellaswag.py's tasks are these, four answers each.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .model import Model
from .task_scoring import TaskError, endings_mean_log_probs, first_best, score_all, swap_draws

MAX_ANSWERS = 100  # llama.cpp's bound on an answer set


@dataclass(frozen=True)
class Task:
    question: str
    answers: tuple[str, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Scored:
    task: Task
    logprobs: tuple[float, ...]
    picked: int

    @property
    def right(self) -> bool:
        return self.task.labels[self.picked] == 1


class _Reader:
    def __init__(self, data: bytes, at: int):
        self.data, self.at = data, at

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise TaskError(f"the file ends inside a task (byte {self.at} of {len(self.data)})")
        piece = self.data[self.at:self.at + n]
        self.at += n
        return piece

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def text(self) -> str:
        return self.take(self.u32()).decode("utf-8", "replace")

    def answers(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        n = self.u32()
        if n > MAX_ANSWERS:
            raise TaskError(f"{n} answers to a task (byte {self.at - 4}): llama.cpp reads at most {MAX_ANSWERS}")
        texts = tuple(self.text() for _ in range(n))
        return texts, struct.unpack(f"<{n}i", self.take(4 * n))

    def task(self) -> Task:
        question = self.text()
        answers, labels = self.answers()
        self.answers()  # mc2: several right answers, not scored
        if not question or not answers or not all(answers):
            raise TaskError(f"a task with an empty question or answer (before byte {self.at})")
        return Task(question, answers, labels)


def read_tasks(data: bytes, n: int = 0) -> tuple[list[Task], int]:
    """(the tasks to score, the file's task count): all in order, or n drawn (0 < n < count)."""
    data = data[:-1] if data.endswith(b"\n") else data  # llama-perplexity's -f
    head = _Reader(data, 0)
    try:
        count = head.u32()
    except TaskError:
        count = 0
    if count == 0:
        raise TaskError("no tasks: not llama.cpp's multiple-choice file (a task count, offsets, then the tasks)")
    offsets = [head.u32() for _ in range(count)]
    if n <= 0 or n >= count:
        return [head.task() for _ in range(count)], count
    return [_Reader(data, offsets[i]).task() for i in swap_draws(count, n)], count


def score_task(model: Model, task: Task) -> Scored:
    means = endings_mean_log_probs(model, task.question, task.answers)
    return Scored(task, means, first_best(means))


def final_scores(scored: list[Scored]) -> tuple[tuple[float, float], tuple[float, float]]:
    """llama-perplexity's `Final result` and `Random chance` (percentages, each with its standard
    error; float32 as it computes them)."""
    n = len(scored)

    def pct(p: np.float32) -> tuple[float, float]:
        sigma = np.sqrt(p * (1 - p) / np.float32(n - 1)) if n > 1 else np.float32(math.nan)
        return float(np.float32(100) * p), float(np.float32(100) * sigma)

    right, answers = sum(s.right for s in scored), sum(len(s.task.answers) for s in scored)
    return pct(np.float32(right) / np.float32(n)), pct(np.float32(n) / np.float32(answers))


def multiple_choice(model: Model, tasks: list[Task], each: Callable[[int, Scored, int], None] | None = None
                    ) -> list[Scored]:
    """Score the tasks in order; `each(i, scored, right so far)` after each."""
    return score_all(model, tasks, score_task, each)
