"""qvl-run's flags for how an answer is sampled and what form it takes, read and checked before
a model is loaded: llama.cpp's --logit-bias, --grammar / --grammar-file, --format and --json-schema,
and its sampler chain's flags (--samplers, --sampling-seq, --typical, --top-nsigma, --xtc-*,
--dynatemp-*, --dry-*: sampler_chain.py). A bad value is one line on stderr and exit code 2 (`fail`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Union

import typer

from .dry import DEFAULT_BREAKERS
from .sampler_chain import ChainOptions, SamplingError, parse_order


def logit_biases(items: list[str]) -> dict[int, float]:
    """llama.cpp's --logit-bias TOKEN_ID(+/-)BIAS values as {token id: bias}."""
    out: dict[int, float] = {}
    for item in items:
        m = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(inf|\d+(?:\.\d*)?|\.\d+)\s*", item)
        if m is None:
            fail(f"--logit-bias {item!r}: TOKEN_ID(+/-)BIAS, e.g. 15043+1 or 15043-inf")
        out[int(m.group(1))] = float(m.group(3)) * (-1 if m.group(2) == "-" else 1)
    return out


def fail(message: str) -> NoReturn:
    typer.echo(f"qvl-run: error: {message}", err=True)
    raise typer.Exit(2)


def grammar_flag(text: Optional[str], path: Optional[Path]) -> Any:
    """--grammar / --grammar-file (llama.cpp's): a GBNF grammar, read and checked before loading."""
    from .gbnf import GrammarError, parse_gbnf

    if text is not None and path is not None:
        fail("--grammar and --grammar-file: choose one")
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{path}: {'file not found' if isinstance(e, FileNotFoundError) else 'not a grammar file'}")
    try:
        return None if text is None else parse_gbnf(text)
    except GrammarError as e:
        fail(f"{path or '--grammar'}: {e}")


def answer_format_flag(value: Optional[str], flag: str = "--format") -> Union[str, dict, None]:
    """--format (or llama.cpp's --json-schema / --json-schema-file, `flag`): None, "json", or a JSON
    schema read from the file it names or inline; checked before loading."""
    from .json_format import format_grammar

    if not value or value == "json" and flag == "--format":
        return value or None
    where = flag
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            what = "json, a JSON schema file or a schema inline ('{...}')" if flag == "--format" else "a JSON schema"
            fail(f"{flag} {value}: {what}; no such file")
        where, value = str(path), path.read_text(errors="replace")
    try:
        schema = json.loads(value)
        format_grammar(schema)
    except ValueError as e:  # json.JSONDecodeError, SchemaError
        fail(f"{where}: {'not JSON' if isinstance(e, json.JSONDecodeError) else e}")
    return schema


@dataclass(frozen=True)
class DryFlags:
    """llama.cpp's --dry-* flags as given (breakers: --dry-sequence-breaker's, "none" for none)."""

    multiplier: float
    base: float
    allowed_length: int
    penalty_last_n: int
    breakers: tuple[str, ...]


def chain_flags(samplers: Optional[str], sequence: Optional[str], typical: Optional[float],
                top_n_sigma: Optional[float], xtc_probability: float, xtc_threshold: float,
                dynatemp_range: float, dynatemp_exp: float, dry: DryFlags,
                mirostat: tuple[int, float, float], adaptive: tuple[float, float]) -> ChainOptions | None:
    """The sampler chain of llama.cpp's flags: --samplers "top_k;top_p;..." (names split at ';')
    or --sampling-seq "kypmxt" (characters) for the order, and the samplers' own options; None
    when none is given (qvl's order, those samplers off). A --dry-base below 1 is left at its
    default, as llama.cpp leaves it. `mirostat`: --mirostat, --mirostat-ent (tau), --mirostat-lr (eta);
    `adaptive`: --adaptive-target, --adaptive-decay."""
    if samplers is not None and sequence is not None:
        fail("--samplers and --sampling-seq: choose one")
    given = (samplers, sequence, typical, top_n_sigma)
    off = (xtc_probability, dynatemp_range, dry.multiplier, mirostat[0]) == (0, 0, 0, 0) and adaptive[0] < 0
    if all(v is None for v in given) and off:
        return None
    breakers = () if "none" in dry.breakers else dry.breakers or DEFAULT_BREAKERS
    try:
        names = None if samplers is None else [n.strip() for n in samplers.split(";") if n.strip()]
        order = (parse_order(names, "--samplers") if names is not None
                 else parse_order(sequence, "--sampling-seq") if sequence is not None else None)
        return ChainOptions(order, typical, top_n_sigma, xtc_probability, xtc_threshold, dynatemp_range,
                            dynatemp_exp, dry.multiplier, dry.base if dry.base >= 1 else 1.75, dry.allowed_length,
                            dry.penalty_last_n, breakers, *mirostat, *adaptive)
    except SamplingError as e:
        fail(str(e))
