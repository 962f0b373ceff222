"""`qvl imatrix MODEL -f TEXT`: an importance matrix of a model over a text (llama-imatrix's file,
imatrix.py computes it), for `qvl quantize --imatrix` or llama-quantize --imatrix."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

HELP = ("An importance matrix of a model over a text, as llama-imatrix computes it: for each weight matrix "
        "of the decoder, how large each of its input columns runs over the text (the mean of its square). "
        "qvl quantize --imatrix (or llama-quantize --imatrix) then spends a quantization's precision where "
        "the inputs are large. Run it on the model at its best precision (F16, BF16 or Q8_0) over text like "
        "what it will read; the file is llama-imatrix's GGUF, so either tool reads the other's. --in-file adds "
        "matrices made before (over other texts) to this one, or with no -f combines them.\n\n"
        "Example: qvl imatrix qwen2.5-vl-7b-f16.gguf -f calibration.txt -o 7b.imatrix.gguf; "
        "qvl quantize qwen2.5-vl-7b-f16.gguf q4_k_m --imatrix 7b.imatrix.gguf")


def _fail(message: str) -> NoReturn:
    typer.echo(f"qvl imatrix: error: {message}", err=True)
    raise typer.Exit(2)


def imatrix_command(
    model: Optional[str] = typer.Argument(None, help="A GGUF file or a stored model's name (not needed to only "
                                                     "combine --in-file matrices)."),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="The text to run (UTF-8)."),
    out: Path = typer.Option(Path("imatrix.gguf"), "-o", "--output", help="The importance matrix to write "
                                                                          "(llama-imatrix's GGUF)."),
    in_files: Optional[List[Path]] = typer.Option(None, "--in-file", help="A matrix to add in (llama-imatrix's GGUF "
                                                                          "or .dat; repeatable): without -f, "
                                                                          "the files combined."),
    ctx_size: int = typer.Option(512, "-c", "--ctx-size", help="Tokens a chunk, each read alone (llama-imatrix's -c)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Read only the first N chunks (default: all)."),
    process_output: bool = typer.Option(False, "--process-output", help="Also output.weight's inputs "
                                                                        "(llama-imatrix's flag; off by default)."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even where a GPU is."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA adapter applied to MODEL at run time (GGUF "
                                             "or PEFT folder; repeatable): the fine-tune's matrix, for qvl quantize "
                                             "--lora --imatrix."),
    lora_scaled: Optional[List[str]] = typer.Option(None, "--lora-scaled", help="FILE:SCALE: --lora with its term "
                                                    "scaled (repeatable)."),
) -> None:
    from ..convert.errors import ConvertError
    from ..convert.imatrix import read_imatrix
    from .config import ConfigError
    from .gguf_file import GGUFError
    from .imatrix import ImatrixError, Sums, chunk_count, collect, merge, write
    from .loader import load
    from .lora import LoraError, lora_sources
    from .model import ModelError
    from .perplexity import PerplexityError
    from .perplexity import chunk_count as text_chunks
    from .perplexity_cli import read_text
    from .store import StoreError
    from .tokenizer import TokenizerError

    if file is None and not in_files:
        _fail("nothing to do: -f TEXT (with MODEL), or --in-file matrices to combine")
    if file is not None and model is None:
        _fail("-f runs a model: give MODEL")
    text = read_text(file, _fail) if file is not None else None
    if out.is_dir():
        _fail(f"-o {out}: is a folder")
    if not out.parent.is_dir():
        _fail(f"-o {out}: no folder {out.parent}")
    sums, datasets = Sums({}, {}), []
    try:
        for path in in_files or ():
            matrix = read_imatrix(path)
            merge(sums, matrix, ctx_size)
            datasets += matrix.datasets
        if text is not None:
            loaded = load(model, device="cpu" if cpu else "auto", plan_ctx=ctx_size,
                          lora=lora_sources(lora or [], lora_scaled or []))
            ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
            n = text_chunks(len(ids), ctx_size, chunks, loaded.cfg.context_length, at_least=1)
            started = time.perf_counter()

            def each(i: int, total: int) -> None:
                seconds = time.perf_counter() - started
                typer.echo(f"[{i + 1}/{total}] {seconds / (i + 1):.2f} s a chunk, ETA "
                           f"{seconds / (i + 1) * (total - i - 1) / 60:.2f} min", err=True)

            collect(loaded, ids, ctx_size, n, process_output, each, sums)
            datasets.append(str(file))
        n_chunks = chunk_count(sums, ctx_size)
        write(out, sums, datasets, n_chunks, ctx_size)
    except (GGUFError, ConfigError, TokenizerError, ModelError, StoreError, ConvertError, PerplexityError,
            ImatrixError, LoraError, KeyError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(f"qvl imatrix: {len(sums.squares)} matrices, {n_chunks} chunks of {ctx_size} tokens, written to {out}",
               err=True)
