"""`qvl-run`: the runtime arrives with its own issue; until then this says so."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, rich_markup_mode=None)

MISSING = ("qvl-run: the inference runtime is not implemented yet (model loading, vision encoder, "
           "decoder and sampling arrive with the runtime issue); today qvl converts models: "
           "see qvl-convert --help")


@app.command(help="Run a Qwen2-VL / Qwen2.5-VL GGUF on images and a prompt (not implemented yet).",
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context, model: str = typer.Argument(None, help="GGUF file")) -> None:
    typer.echo(MISSING, err=True)
    raise typer.Exit(2)


def main() -> None:
    app(prog_name="qvl-run")
