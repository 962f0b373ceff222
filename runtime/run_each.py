"""`qvl-run --each`: one question asked of each --image on its own, the model loaded once (a
folder of photos captioned, pages read one by one). Answers come in the pictures' order: a
"PATH: answer" line each (streamed with --stream), or with --json one JSON object a line
(JSON Lines) with its "image". Each answer starts from the same rendered prompt up to the
picture, which the KV cache keeps (prompt_cache.py): the system prompt is not read again. A
picture that cannot be read or answered is one line on stderr and the next one goes on; the
run's exit code is then 1. Running out of memory or a failing GPU kernel ends the run. With
--boxes FILE (named with {stem} or {name}), each answer's boxes are drawn on its picture."""

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
from .boxes_cli import boxes_path
from .generation import answer_json, answer_timings
from .run_cli import _draw_answer_boxes, _fail, _out_of_memory, _triton_failure


def ask_each(model: Model, text: str, images: list[Path], system: str | None, gen_kwargs: dict[str, Any],
             json_out: bool, stream: bool, logprobs: int | None, load_s: float, boxes: Path | None = None,
             urls: dict[Path, str] | None = None) -> int:
    """Answers each picture in turn (with `boxes`, a file name with {stem} or {name}: each
    answer's boxes drawn on its picture); returns how many failed. `urls`: the URL a fetched
    picture is named by (media_args.py)."""
    failed = 0
    for path in images:
        shown = (urls or {}).get(path, str(path))
        streamed = stream and not json_out
        try:
            if streamed:
                sys.stdout.write(f"{shown}: ")
                for piece in model.generate(text, [str(path)], stream=True, system=system, **gen_kwargs):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                if boxes is not None and isinstance(model.last_generation, Generation):
                    _draw_answer_boxes(model, model.last_generation, path, boxes_path(boxes, path))
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
            _fail(_out_of_memory(f"answering about {shown}"))
        except Exception as e:
            why = _triton_failure(e)
            if why is None:
                raise
            sys.stdout.flush()
            _fail(why)
        assert isinstance(out, Generation)
        found = None if boxes is None else _draw_answer_boxes(model, out, path, boxes_path(boxes, path))
        if json_out:
            reply = {"image": shown, **answer_json(out, answer_timings(out, load_s))}
            if found is not None:
                reply["boxes"] = [b.as_json() for b in found]
            typer.echo(json.dumps(reply, ensure_ascii=False))
        else:
            typer.echo(f"{shown}: {out.text}")
        load_s = 0.0  # the model was loaded once, before the first
    return failed
