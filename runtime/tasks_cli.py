"""`qvl perplexity --hellaswag` / `--winogrande` / `--multiple-choice`: llama-perplexity's task
scores, its running line a task on standard output in its format (hellaswag.py, winogrande.py,
multiple_choice.py score them); `--json`: one object at the end, the running lines on standard
error instead."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from .lora import LoraSource
from .model import Model

Fail = Callable[[str], NoReturn]


@contextmanager
def _loaded(model: str, device: str, fail: Fail, lora: Sequence[LoraSource] = ()) -> Iterator[Callable[[], Model]]:
    """The model, loaded when asked (after the file is read); any refusal one line through `fail`."""
    from .config import ConfigError
    from .gguf_file import GGUFError
    from .loader import load
    from .model import ModelError
    from .store import StoreError
    from .task_scoring import TaskError
    from .tokenizer import TokenizerError

    try:
        yield lambda: load(model, device=device, lora=lora)
    except (GGUFError, ConfigError, TokenizerError, ModelError, StoreError, TaskError) as e:
        fail(str(e).strip("'\""))


def run_hellaswag(model: str, text: str, n: int, device: str, json_out: bool, fail: Fail,
                  lora: Sequence[LoraSource] = ()) -> None:
    """llama-perplexity --hellaswag: the running acc_norm and its 95% interval, a line a task."""
    from .hellaswag import hellaswag, parse_tasks, wilson

    def each(i: int, scored, right: int) -> None:
        low, high = wilson(right, i + 1)
        typer.echo(f"{i + 1}\t{100 * right / (i + 1):3.8f}%\t[{100 * low:3.4f}%, {100 * high:3.4f}%]", err=json_out)

    with _loaded(model, device, fail, lora) as load:
        tasks = parse_tasks(text)
        loaded = load()
        typer.echo(f"qvl perplexity: {len(tasks)} tasks in the file, {min(n, len(tasks))} drawn as "
                   "llama-perplexity draws them", err=True)
        if not json_out:
            typer.echo("\ntask\tacc_norm\t95% confidence interval")
        scored = hellaswag(loaded, tasks, n, each)
    right = sum(s.right for s in scored)
    if not json_out:
        typer.echo("")
        return
    low, high = wilson(right, len(scored))
    typer.echo(json.dumps({"model": model, "tasks": len(scored), "acc_norm": 100 * right / len(scored),
                           "ci95": [100 * low, 100 * high], "picked": [s.picked for s in scored],
                           "gold": [s.task.labels.index(1) for s in scored], "logprobs": [list(s.logprobs) for s in scored]}))


def run_winogrande(model: str, text: str, n: int, device: str, json_out: bool, fail: Fail,
                   lora: Sequence[LoraSource] = ()) -> None:
    """llama-perplexity --winogrande: a line a task (running accuracy, both choices' scores, the
    pick, the answer), then the final score and its standard error."""
    from .winogrande import final_score, parse_tasks, winogrande

    def each(i: int, scored, right: int) -> None:
        typer.echo(f"{i + 1}\t{100.0 * right / (i + 1):.4f}\t{scored.scores[0]:10.6f}  {scored.scores[1]:10.6f}  "
                   f"{scored.picked}  {scored.task.answer}", err=json_out)

    with _loaded(model, device, fail, lora) as load:
        tasks, skipped = parse_tasks(text)
        loaded = load()
        chosen = len(tasks) if n == 0 or n >= len(tasks) else n
        typer.echo(f"qvl perplexity: {len(tasks)} tasks in the file ({skipped} lines not read), {chosen} "
                   f"{'drawn as llama-perplexity draws them' if chosen < len(tasks) else 'in order'}", err=True)
        scored = winogrande(loaded, tasks, n, each)
    right = sum(s.right for s in scored)
    score, sigma = final_score(right, len(scored))
    if not json_out:
        typer.echo(f"\nFinal Winogrande score({len(scored)} tasks): {score:.4f} +/- {sigma:.4f}")
        return
    typer.echo(json.dumps({"model": model, "tasks": len(scored), "score": score,
                           "uncertainty": None if math.isnan(sigma) else sigma,
                           "picked": [s.picked for s in scored], "answer": [s.task.answer for s in scored],
                           "scores": [list(s.scores) for s in scored]}))


def run_multiple_choice(model: str, path: Path, n: int, device: str, json_out: bool, fail: Fail,
                        lora: Sequence[LoraSource] = ()) -> None:
    """llama-perplexity --multiple-choice: the running acc_norm a line a task, then the final result
    and what random choices would score."""
    from .multiple_choice import final_scores, multiple_choice, read_tasks

    def each(i: int, scored, right: int) -> None:
        typer.echo(f"{i + 1}\t{100.0 * right / (i + 1):.8f}", err=json_out)

    try:
        data = path.read_bytes()
    except OSError as e:
        fail(f"{path}: {e.strerror or e}")
    with _loaded(model, device, fail, lora) as load:
        tasks, count = read_tasks(data, n)
        loaded = load()
        typer.echo(f"qvl perplexity: {count} tasks in the file, {len(tasks)} "
                   f"{'drawn as llama-perplexity draws them' if len(tasks) < count else 'in order'}", err=True)
        if not json_out:
            typer.echo("\ntask\tacc_norm")
        scored = multiple_choice(loaded, tasks, each)
    (score, sigma), (chance, chance_sigma) = final_scores(scored)
    if not json_out:
        typer.echo(f"\nFinal result: {score:.4f} +/- {sigma:.4f}\nRandom chance: {chance:.4f} +/- {chance_sigma:.4f}")
        return
    typer.echo(json.dumps({"model": model, "tasks": len(scored), "score": score,
                           "uncertainty": None if math.isnan(sigma) else sigma, "random_chance": chance,
                           "picked": [s.picked for s in scored], "right": [s.right for s in scored],
                           "logprobs": [list(s.logprobs) for s in scored]}))
