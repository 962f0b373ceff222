"""`qvl`: the umbrella command (convert, inspect, run)."""

from __future__ import annotations

import sys

import typer

from ..convert import cli as convert_cli
from . import run_cli
from .gguf_file import GGUFError
from .inspect import inspect_file

app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True,
                  help="qvl: a local runtime for Qwen2-VL and Qwen2.5-VL.")

app.command("convert", help=convert_cli.HELP)(convert_cli.command)


@app.command("inspect", help="Show a GGUF file's metadata (long arrays summarised) and tensor table.\n\n"
                             "Example: qvl inspect qwen2.5-vl-3b-q4_k_m.gguf")
def inspect_cmd(
    path: str = typer.Argument(..., help="Any GGUF file (ours, llama.cpp's or Ollama's)."),
    full: bool = typer.Option(False, "--full", help="Print arrays and strings in full."),
) -> None:
    try:
        inspect_file(path, sys.stdout, full)
    except GGUFError as e:
        typer.echo(f"qvl inspect: error: {e}", err=True)
        raise typer.Exit(2) from None
    except BrokenPipeError:  # `qvl inspect x.gguf | head`
        sys.stderr.close()


app.command("run", help=run_cli.HELP)(run_cli.run)
