"""HellaSwag's commonsense score as llama-perplexity's --hellaswag computes it (acc_norm).

The file is llama.cpp's: six lines a task (the context, the index of the right ending, then the
four endings), e.g. klosax/hellaswag_text_data's hellaswag_val_full.txt. llama.cpp takes
`tasks` of them in a random order: std::mt19937 seeded with 1, each task drawn by
uniform_int_distribution<size_t>(0, left - 1) from those left (libstdc++'s: GCC 11's and later,
Lemire's method on the generator's 32-bit words), which this module draws the same way. Each
ending is scored as the mean log-probability of its tokens after the context ("context ending",
tokenized whole); the context's shared tokens are read once and each ending's after them, from
the same cache. The task counts when the right ending has the highest mean (the first among
equals); the running accuracy comes with the Wilson score interval at 95%.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .llama_random import StdMt19937
from .model import Model
from .multiple_choice import Scored, Task, multiple_choice
from .task_scoring import TaskError


def parse_tasks(text: str) -> list[Task]:
    """llama.cpp's six lines a task (split on newlines, as std::getline: no trailing empty line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise TaskError(f"{len(lines)} lines: a HellaSwag file has six a task (context, the right ending's "
                        "index, four endings)")
    tasks = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise TaskError(f"line {i + 2}: the right ending's index is 0-3, not {label!r}")
        tasks.append(Task(lines[i], tuple(lines[i + 2:i + 6]), tuple(int(k == int(label)) for k in range(4))))
    return tasks


def uniform_below(gen: StdMt19937, n: int) -> int:
    """libstdc++'s uniform_int_distribution(0, n - 1) on a 32-bit generator (n < 2^32): Lemire's
    nearly divisionless method, as its _S_nd does it."""
    product = gen() * n
    if product & StdMt19937.max < n:
        threshold = ((1 << 32) - n) % n
        while product & StdMt19937.max < threshold:
            product = gen() * n
    return product >> 32


def select(tasks: list[Task], n: int) -> list[Task]:
    """llama-perplexity's pick of min(n, all) tasks: drawn at random from those left, seed 1."""
    left, gen, picked = list(tasks), StdMt19937(1), []
    for _ in range(min(n, len(tasks))):
        picked.append(left.pop(uniform_below(gen, len(left))))
    return picked


def wilson(right: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of right / n, as llama-perplexity computes it."""
    za = 1.95996398454
    freq, z = right / n, za * za / n
    cnf = z * math.sqrt(n * (4.0 * freq * (1 - freq) + z)) / (za + za)
    return (freq + z * 0.5 - cnf) / (1.0 + z), (freq + z * 0.5 + cnf) / (1.0 + z)


def hellaswag(model: Model, tasks: list[Task], n: int,
              each: Callable[[int, Scored, int], None] | None = None) -> list[Scored]:
    """Score llama-perplexity's selection of `n` tasks, each as a multiple-choice task is scored;
    `each(i, scored, right so far)` after each."""
    return multiple_choice(model, select(tasks, n), each)
