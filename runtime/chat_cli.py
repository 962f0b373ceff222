"""qvl-run's terminal chat, as `ollama run`'s: answers stream, commands start with a slash
(`/image`, `/set`, `/show`, `/save`, `/boxes`, `/clear`, `/bye`), a message of several lines
goes between \"\"\"s, and `/set verbose` (or qvl-run --verbose) prints each answer's figures as
Ollama's do (chat_input.py reads the lines)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
import typer

from . import answer_stream
from .boxes_cli import draw_answer_boxes
from .chat_input import LineReader
from .grounding import GroundingError, counted
from .image import ImageError
from .go_template import TemplateError
from .loader import open_ended
from .model import Model, ModelError
from .prompt_paths import pictures_in
from .run_cli import _out_of_memory, _triton_failure
from .video import VideoError

CHAT_HELP = """/image PATH                 attach a picture to your next message (or name it in the message:
                            ./cat.png, /home/me/cat.jpg, as in `ollama run`)
/set parameter NAME VALUE   e.g. temperature 0.7, num_predict 256 (Ollama's names, as in a Modelfile)
/set system TEXT            the system prompt, from the next answer on
/set format json            answers that are one JSON object (/set noformat: free text again)
/set verbose                each answer's token counts and rates after it (/set quiet: none)
/show info|parameters       the model (architecture, size, quantization, ...); the parameters in force
/show system|template       the system prompt; the prompt template
/show modelfile|license     this chat's Modelfile (as /save would store it); the GGUF's license
/boxes FILE                 draw the boxes and points of the last answer on the last picture, into FILE
/save NAME                  store this model with the conversation, system prompt and /set parameters
/clear                      forget the conversation (and pictures not yet sent)
/bye                        leave (also /exit, /quit, Ctrl-D)
/help                       this list
\"\"\" ... \"\"\"                 a message of several lines
Ctrl-C stops an answer; earlier turns' prompt is reused, not read again."""

def chat_set(arg: str, gen_kwargs: dict, messages: list[dict], saved: dict) -> str:
    """`/set parameter NAME VALUE` or `/set system TEXT`: changes gen_kwargs or the conversation's
    system message in place (and `saved`, the parameters /save stores, by Ollama's names);
    returns what to say."""
    from .modelfile import ModelfileError, check_params, generate_kwargs

    what, _, rest = arg.strip().partition(" ")
    if (what, rest.strip()) in (("format", "json"), ("noformat", "")):
        gen_kwargs["format"] = "json" if what == "format" else None
        return "(answers are one JSON object)" if what == "format" else "(answers are free text)"
    if what == "system" and rest.strip():
        system = {"role": "system", "content": rest.strip()}
        messages[:] = [system] + [m for m in messages if m["role"] != "system"]
        return "(system prompt set)"
    name, _, value = rest.strip().partition(" ")
    if what != "parameter" or not value.strip():
        return "usage: /set parameter NAME VALUE, /set system TEXT, /set format json or /set noformat"
    try:
        typed = check_params({name.lower(): value.strip()}, strict=True)
    except ModelfileError as e:
        return f"qvl-run: error: {e}"
    saved.update(typed)
    if "num_predict" in typed:
        typed["num_predict"], gen_kwargs["ctx_size"] = open_ended(typed["num_predict"], gen_kwargs["ctx_size"])
    gen_kwargs.update(generate_kwargs(typed, gen_kwargs.get("chain")))
    return f"(set {name.lower()} to {value.strip()})"


def chat_parameters(gen_kwargs: dict) -> str:
    """`/show parameters`: the sampling and length settings, by Ollama's names."""
    from .modelfile import CHAIN_PARAMS, USED, generate_key
    from .sampler_chain import ChainOptions

    rows = []
    for name in USED:
        value = gen_kwargs.get(generate_key(name))
        if name in CHAIN_PARAMS:  # the chain's, where it differs from llama.cpp's default
            value = getattr(value, name) if value is not None and getattr(value, name) != getattr(
                ChainOptions(), name) else None
        shown = " ".join(json.dumps(s) for s in value) if isinstance(value, list) else value
        rows.append(f"{name:<16}{'(default)' if value is None or value == [] else shown}")
    return "\n".join(rows)


def chat_show(model: Model, what: str, gen_kwargs: dict, messages: list[dict], saved: dict) -> str:
    """`/show info|license|modelfile|parameters|system|template`, as Ollama's (`saved`: the
    parameters /set in this chat, which its Modelfile carries as Ollama's does)."""
    from .inspect import model_rows
    from .modelfile import render

    if what == "parameters":
        return chat_parameters(gen_kwargs)
    if what == "info":
        vision = model.files[1] if len(model.files) > 1 else model.text_file if model.vision is not None else None
        return "\n".join(f"  {k:<18}{v}" for k, v in model_rows(model.text_file, vision))
    if what == "system":
        stored = model.defaults.get("system") or "(no system prompt)"  # chat.with_stored puts it in
        return next((m["content"] for m in messages if m["role"] == "system"), stored)
    if what == "template":
        template = model.chat_template
        return getattr(template, "source", template) or "(the built-in Qwen2-VL template)"
    if what == "license":  # the GGUF's general.license (qvl-run reads a stored LICENSE nowhere else)
        return str(model.text_file.get("general.license") or "No license was specified for this model.")
    if what == "modelfile":
        system, turns = _session(model, messages)
        files = [str(f.path) for f in model.files]
        return render(files, saved, getattr(model.chat_template, "source", None), system,
                      model.text_file.get("general.license"), Path(files[0]).name, turns)
    return "usage: /show info, license, modelfile, parameters, system or template"


def _session(model: Model, messages: list[dict]) -> tuple[str | None, list[dict]]:
    """The chat's system prompt, and its turns as text (the stored conversation first; pictures left
    out), as /save stores them and /show modelfile shows them."""
    def text(content: object) -> str:
        if isinstance(content, str):
            return content
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))  # type: ignore[union-attr]

    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    return system, list(model.defaults.get("messages", [])) + [
        {"role": m["role"], "content": text(m["content"])} for m in messages if m["role"] != "system"]


def save(model: Model, name: str, messages: list[dict], params: dict) -> str:
    """`/save NAME`, as Ollama's: a stored model of this one's files with the conversation as its
    MESSAGEs (their text: pictures are not kept), the system prompt as its SYSTEM and the
    parameters set in this chat as its PARAMETERs."""
    from .store import Store, StoreError

    files = [Path(f.path) for f in model.files]
    system, turns = _session(model, messages)
    try:
        entry = Store().create(name, files[0], files[1] if len(files) > 1 else None, params=params or None,
                               system=system, messages=turns)
    except (StoreError, OSError) as e:
        return f"qvl-run: error: {e}"
    pictures = any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
                   for m in messages)
    return f"(saved as {entry.name}{'; its pictures are not kept' if pictures else ''})"


def draw_last(model: Model, messages: list[dict], path: Path) -> str:
    """/boxes FILE: the last answer's boxes and points drawn on the conversation's last picture."""
    pictures = [c["image"] for m in messages if isinstance(m["content"], list) for c in m["content"]
                if c.get("type") == "image"]
    answer = model.last_generation
    if not pictures or answer is None or not answer.image_sizes:
        return "(no answer about a picture yet)"
    try:
        found = draw_answer_boxes(model, answer, pictures[-1], path, index=len(answer.image_sizes) - 1)
    except (ImageError, GroundingError) as e:
        return f"qvl-run: error: {e}"
    return (f"({counted(found)} drawn on {path})" if found else
            f"(the last answer gives no boxes or points; {path} not written)")


def interactive(model: Model, gen_kwargs: dict, images: list[str], system: Optional[str],
                keep: Optional[Callable[[], None]] = None, history: Optional[Path] = None,
                verbose: bool = False) -> None:
    """A chat on the terminal, as `ollama run`: answers stream, commands start with a slash;
    `keep()` after each answer (--prompt-cache: the KV cache written to its file); `history`: the
    file of earlier lines (chat_input.py; None: none kept); `verbose`: each answer's figures."""
    reader = LineReader(history)
    try:
        _chat_loop(model, gen_kwargs, images, system, keep, reader, verbose)
    finally:
        reader.close()


def _kept(pieces: Iterator[Any], said: list[str]) -> Iterator[Any]:
    """`pieces` as they come, the answer's text ones also put in `said`."""
    for piece in pieces:
        if isinstance(piece, str):
            said.append(piece)
        yield piece


def summary(g: Any, total_s: float) -> str:
    """An answer's figures as `ollama run --verbose` prints them (api.Metrics' Summary)."""
    prompt_s = g.timings.get("prefill_s", 0.0) + g.timings.get("vision_ms", 0.0) / 1e3
    decode_s, n = g.timings.get("decode_s", 0.0), len(g.token_ids)
    lines = [f"total duration:       {go_duration(total_s)}", f"prompt eval count:    {g.prompt_tokens} token(s)"]
    if prompt_s > 0:
        lines += [f"prompt eval duration: {go_duration(prompt_s)}",
                  f"prompt eval rate:     {g.prompt_tokens / prompt_s:.2f} tokens/s"]
    lines.append(f"eval count:           {n} token(s)")
    if decode_s > 0:
        lines += [f"eval duration:        {go_duration(decode_s)}",
                  f"eval rate:            {n / decode_s:.2f} tokens/s"]
    return "\n".join(lines)


def go_duration(seconds: float) -> str:
    """Seconds as Go prints a time.Duration: 1.25s, 131.2ms, 45µs (to the microsecond)."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return f"{seconds / scale:.6f}".rstrip("0").rstrip(".") + unit
    return f"{round(seconds * 1e6)}µs"


def _chat_loop(model: Model, gen_kwargs: dict, images: list[str], system: Optional[str],
               keep: Optional[Callable[[], None]], reader: LineReader, verbose: bool) -> None:
    gen_kwargs = {k: v for k, v in gen_kwargs.items() if k != "videos"}
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    pending, saved = list(images), {}
    typer.echo("qvl chat: type a message; /image PATH attaches a picture, /help lists commands, /bye leaves",
               err=True)
    while True:
        try:
            line, quoted = reader.read()
        except EOFError:
            typer.echo("", err=True)
            return
        except KeyboardInterrupt:
            typer.echo("\n(use /bye or Ctrl-D to leave)", err=True)
            continue
        if not line:
            continue
        if line.startswith("/") and not quoted:
            command, _, arg = line.partition(" ")
            if command in ("/bye", "/exit", "/quit"):
                return
            if command in ("/help", "/?"):
                typer.echo(CHAT_HELP, err=True)
            elif command == "/clear":
                messages, pending = [m for m in messages if m["role"] == "system"], []
                typer.echo("(conversation cleared)", err=True)
            elif command == "/set" and arg.strip() in ("verbose", "quiet"):
                verbose = arg.strip() == "verbose"
                typer.echo(f"Set '{arg.strip()}' mode.", err=True)  # Ollama's words
            elif command == "/set":
                typer.echo(chat_set(arg, gen_kwargs, messages, saved), err=True)
            elif command == "/save" and arg.strip():
                typer.echo(save(model, arg.strip(), messages, saved), err=True)
            elif command == "/show":
                typer.echo(chat_show(model, arg.strip(), gen_kwargs, messages, saved), err=True)
            elif command == "/boxes" and arg.strip():
                typer.echo(draw_last(model, messages, Path(arg.strip()).expanduser()), err=True)
            elif command == "/image" and arg.strip():
                path = Path(arg.strip()).expanduser()
                if path.is_file():
                    pending.append(str(path))
                    typer.echo(f"(attached {path}: it goes with your next message)", err=True)
                else:
                    why = "is a folder, not an image" if path.is_dir() else "image not found"
                    typer.echo(f"qvl-run: error: {path}: {why}", err=True)
            else:
                typer.echo(f"unknown command {line!r}; /help lists them", err=True)
            continue
        if model.vision is not None:  # image files the line names go with it, as in `ollama run`
            line, named = pictures_in(line)
            for p in named:
                typer.echo(f"Added image '{p}'", err=True)
            pending += named
        content = [{"type": "image", "image": p} for p in pending] + [{"type": "text", "text": line}]
        messages.append({"role": "user", "content": content})
        said: list[str] = []
        started = time.perf_counter()
        status = sys.stderr if answer_stream.on_terminal(sys.stderr) else None  # the prompt's reading shown there
        try:
            pieces = model.chat(messages, stream=True, **gen_kwargs, **({"progress": True} if status else {}))
            answer_stream.write_answer(_kept(pieces, said), sys.stdout, status)
        except (ModelError, ImageError, VideoError, TemplateError) as e:
            typer.echo(f"qvl-run: error: {e}", err=True)
            messages.pop()
            continue
        except torch.OutOfMemoryError:
            typer.echo(f"\nqvl-run: error: {_out_of_memory('answering')}", err=True)
            messages.pop()
            continue
        except Exception as e:
            why = _triton_failure(e)
            if why is None:
                raise
            typer.echo(f"\nqvl-run: error: {why}", err=True)
            messages.pop()
            continue
        except KeyboardInterrupt:
            typer.echo("\n(stopped)", err=True)
            sys.stdout.write("\n")
        answer = "".join(said)
        if verbose and model.last_generation is not None:
            typer.echo(summary(model.last_generation, time.perf_counter() - started), err=True)
        pending = []
        messages.append({"role": "assistant", "content": answer})
        if keep is not None:
            keep()
