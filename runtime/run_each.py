"""`qvl-run --each`: one question asked of each --image on its own, the model loaded once (a
folder of photos captioned, pages read one by one). Answers come in the pictures' order: a
"PATH: answer" line each (streamed with --stream), or with --json one JSON object a line
(JSON Lines) with its "image". Each answer starts from the same rendered prompt up to the
picture, which the KV cache keeps (prompt_cache.py): the system prompt is not read again. A
picture that cannot be read or answered is one line on stderr and the next one goes on; the
run's exit code is then 1. Running out of memory or a failing GPU kernel ends the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import typer

from .go_template import TemplateError
from .image import ImageError
from .model import Generation, Model, ModelError
from .run_cli import _fail, _out_of_memory, _triton_failure, answer_json, answer_timings


def ask_each(model: Model, text: str, images: list[Path], system: str | None, gen_kwargs: dict[str, Any],
             json_out: bool, stream: bool, logprobs: int | None, load_s: float) -> int:
    """Answers each picture in turn; returns how many failed."""
    failed = 0
    for path in images:
        streamed = stream and not json_out
        try:
            if streamed:
                sys.stdout.write(f"{path}: ")
                for piece in model.generate(text, [str(path)], stream=True, system=system, **gen_kwargs):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                continue
            out = model.generate(text, [str(path)], system=system, logprobs=logprobs, **gen_kwargs)
        except (ModelError, ImageError, TemplateError) as e:
            if streamed:
                sys.stdout.write("\n")
            sys.stdout.flush()
            typer.echo(f"qvl-run: error: {e}", err=True)
            failed += 1
            continue
        except torch.OutOfMemoryError:
            sys.stdout.flush()
            _fail(_out_of_memory(f"answering about {path}"))
        except Exception as e:
            why = _triton_failure(e)
            if why is None:
                raise
            sys.stdout.flush()
            _fail(why)
        assert isinstance(out, Generation)
        if json_out:
            typer.echo(json.dumps({"image": str(path), **answer_json(out, answer_timings(out, load_s))},
                                  ensure_ascii=False))
        else:
            typer.echo(f"{path}: {out.text}")
        load_s = 0.0  # the model was loaded once, before the first
    return failed
