"""`qvl embed MODEL [TEXT ...]`: texts' embeddings as JSON (llama.cpp's llama-embedding, Ollama's
/api/embed without a server): each text's last-token final-norm hidden state, L2-normalized,
the texts read side by side (embed_api.embeddings_of)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

HELP = ("Print texts' embeddings as JSON ({\"model\", \"embeddings\", \"prompt_eval_count\"}, as Ollama's "
        "/api/embed answers): each text's last-token final-norm hidden state, L2-normalized. With no TEXT, "
        "one text a line from standard input.\n\nExample: qvl embed qwen2.5-vl:3b \"a cat\" \"a dog\"")


def embed_command(
    model: str = typer.Argument(..., help="A GGUF file or a stored model's name."),
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to embed (none: one a line from standard input)."),
    no_normalize: bool = typer.Option(False, "--no-normalize", help="The hidden states as they are."),
    dimensions: Optional[int] = typer.Option(None, "--dimensions", help="Keep the first N values (normalized again)."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even where a GPU is."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="LoRA adapter applied at run time (GGUF or PEFT "
                                             "folder; repeatable, or A,B), as llama-embedding's --lora."),
    lora_scaled: Optional[List[str]] = typer.Option(None, "--lora-scaled", help="FILE:SCALE: --lora at that scale."),
) -> None:
    from ..convert.errors import ConvertError
    from .cli import _store_fail as _fail  # qvl's one line and exit 2
    from .config import ConfigError
    from .embed_api import embedding, embeddings_of
    from .gguf_file import GGUFError
    from .loader import load
    from .lora import LoraError, lora_sources
    from .model import ModelError
    from .store import StoreError
    from .tokenizer import TokenizerError

    items = list(texts) if texts else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not items:
        _fail("no text to embed (give TEXT arguments, or lines on standard input)")
    if any(not t for t in items):
        _fail("an empty text has no embedding")
    try:
        loaded = load(model, device="cpu" if cpu else "auto", lora=lora_sources(lora or [], lora_scaled or []))
        width = loaded.cfg.n_embd
        if dimensions is not None and not 1 <= dimensions <= width:
            _fail(f"--dimensions {dimensions}: 1 to the model's {width}")
        ids = [loaded.tokenize(t, [])[0] for t in items]
        vectors = [embedding(last, not no_normalize, dimensions) for last in embeddings_of(loaded, ids)]
    except (GGUFError, ConfigError, TokenizerError, ModelError, StoreError, ConvertError, LoraError, KeyError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(json.dumps({"model": model, "embeddings": vectors, "prompt_eval_count": sum(map(len, ids))}))
