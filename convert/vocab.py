"""The tokenizer of a checkpoint (tokenizer.json, tokenizer_config.json) as GGUF data.

Both layouts write the byte-level BPE vocabulary as `gpt2` with pre-tokenizer `qwen2`, every id
up to vocab_size (ids with no token are padding), and the merges. Token types follow each
tool's own converter:
  llama.cpp: 1 normal, 3 control (special added tokens and ones that look like `<|...|>`),
             4 user-defined (other added tokens), 5 unused (`[PAD<id>]`).
  Ollama:    the same for real tokens, `[PAD<n>]` padding typed user-defined with score -1,
             and scores = the token id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType

from .errors import ConvertError


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]  # llama.cpp padding
    types: tuple[int, ...]
    merges: tuple[str, ...]
    real: frozenset[int]  # ids that have a token
    special: frozenset[int]  # ids of added tokens marked special (or looking special)
    added: frozenset[int]  # ids of all added tokens
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eos_ids: tuple[int, ...]  # generation_config's stop ids, when it lists several
    chat_template: str | None

    def ollama_tokens(self) -> tuple[list[str], list[float], list[int]]:
        tokens, scores, types = [], [], []
        pad = 0
        for i, tok in enumerate(self.tokens):
            if i in self.real:
                tokens.append(tok)
                scores.append(float(i))
                types.append(int(TokenType.CONTROL if i in self.special else
                                 TokenType.USER_DEFINED if i in self.added else TokenType.NORMAL))
            else:
                tokens.append(f"[PAD{pad}]")
                scores.append(-1.0)
                types.append(int(TokenType.USER_DEFINED))
                pad += 1
        return tokens, scores, types


def _looks_special(tok: str) -> bool:
    return tok.startswith("<|") and tok.endswith("|>")


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: file not found (the tokenizer is required)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: malformed JSON ({e})") from None


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, str):
        return template
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    path = folder / "chat_template.json"
    if path.exists():
        data = _load(path)
        if isinstance(data.get("chat_template"), str):
            return data["chat_template"]
    return None


def load_vocab(folder: Path, vocab_size: int, config_bos: int | None) -> Vocab:
    tj = _load(folder / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{folder / 'tokenizer.json'}: expected a BPE tokenizer with a vocab")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added: set[int] = set()
    special: set[int] = set()
    for tok in tj.get("added_tokens") or []:
        i, content = tok["id"], tok["content"]
        by_id[i] = content
        added.add(i)
        if tok.get("special") or _looks_special(content):
            special.add(i)
    if by_id and max(by_id) >= vocab_size:
        raise ConvertError(f"{folder / 'tokenizer.json'}: token id {max(by_id)} >= vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.CONTROL if i in special else
                             TokenType.USER_DEFINED if i in added else TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _load(cfg_path) if cfg_path.exists() else {}
    ids = {t: i for i, t in by_id.items()}

    def special_id(key: str) -> int | None:
        content = _content(tok_cfg.get(key))
        return ids.get(content) if content is not None else None

    eos_ids: tuple[int, ...] = ()
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        eos = _load(gen_path).get("eos_token_id")
        if isinstance(eos, list):
            eos_ids = tuple(int(e) for e in eos)
    bos = special_id("bos_token")
    return Vocab(
        tokens=tuple(tokens),
        types=tuple(types),
        merges=tuple(merges),
        real=frozenset(by_id),
        special=frozenset(special),
        added=frozenset(added),
        bos_id=bos if bos is not None else config_bos,
        eos_id=special_id("eos_token"),
        pad_id=special_id("pad_token"),
        eos_ids=eos_ids,
        chat_template=_chat_template(folder, tok_cfg),
    )
