"""`qvl-run --prompt-cache FILE` (llama.cpp's flag): the KV cache a generation leaves, kept in a file
for the next run, so that a question about the same picture (or any prompt that starts the same)
skips the vision tower and the shared part of the prompt, as the server's kept cache does between
requests (prompt_cache.py says what is reused: up to where the two prompts' tokens, pictures
compared by their pixels, first differ).

The file is torch.save's of plain data read back with weights_only: a format tag, the settings
the cache was made under (the model files' names, sizes and modification times, the placement,
the attention and CPU GEMM dtypes, torch's version), the kept tokens' identities, the pictures'
hashes and each layer's keys and values. A file made under other settings is not used (a cache
of other weights, or of other arithmetic, would not give the answer a fresh run gives): `restore`
says why in one line, and the run reads its prompt whole.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .atomic import replacing
from .cpu_gemm import gemm_dtype
from .decoder import KVCache
from .model import Model

FORMAT = "qvl-prompt-cache/1"


def problem(path: Path, each: bool) -> str | None:
    """What is wrong with `--prompt-cache path` for this run, before the model is loaded; None: nothing."""
    if each:
        return "--prompt-cache with --each: one question a run (the pictures differ: nothing to reuse)"
    if path.is_dir():
        return f"--prompt-cache {path}: is a folder"
    if not path.parent.is_dir():
        return f"--prompt-cache {path}: no folder {path.parent}"
    return None


def settings(model: Model) -> str:
    """What the cached keys and values depend on, besides the tokens: one string."""
    files = [(p.name, os.stat(p).st_size, os.stat(p).st_mtime_ns) for f in model.files for p in f.paths]
    return json.dumps({"files": files, "placement": repr(model.placement), "attn": str(model.decoder.attn_dtype),
                       "cpu_gemm": str(gemm_dtype()), "torch": torch.__version__})


def parts(store: Any) -> list[torch.Tensor]:
    """A layer's keys or values as tensors: the tensor, or a q8_0 cache's values and scales."""
    return [store] if isinstance(store, torch.Tensor) else [store.q, store.d]


def let_go(model: Model) -> None:
    """The model's kept cache dropped (its memory freed before another is made): the next
    generation reads its prompt whole."""
    model.keep_prompt(KVCache(model.cfg, 0), [], [])


def save(model: Model, path: Path) -> int:
    """Write what the last generation's cache holds to `path` (whole, or not at all); the tokens
    written (0: none kept, nothing written)."""
    cache, keys, hashes = model.kept_prompt()
    n = min(len(keys), cache.length) if cache is not None else 0
    if cache is None or n == 0:
        return 0
    layers = [[t[:, :n].to("cpu", copy=True) for t in parts(s)] for s in cache.k + cache.v]
    data = {"format": FORMAT, "settings": settings(model), "keys": keys[:n], "hashes": hashes, "layers": layers}
    with replacing(Path(path)) as part:
        torch.save(data, part)
    return n


def restore(model: Model, path: Path) -> tuple[int, str | None]:
    """Give the model the cache `path` holds: (its tokens, None), or (0, why it was not used);
    a missing file is (0, None), as for a first run. The model's kept cache is let go first, so
    that a GPU never holds both; a file whose layers then do not fit leaves the model none, as a
    failed restore empties llama.cpp's slot."""
    path = Path(path)
    if not path.exists():
        return 0, None
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        return 0, f"{path}: not a prompt cache qvl can read ({type(e).__name__})"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return 0, f"{path}: not a qvl prompt cache"
    if data.get("settings") != settings(model):
        return 0, f"{path}: made with another model file or other settings; the prompt is read whole"
    keys, layers, hashes = data.get("keys"), data.get("layers"), data.get("hashes")
    if not (isinstance(keys, list) and all(isinstance(k, int) for k in keys) and isinstance(hashes, list)
            and all(isinstance(h, str) and re.fullmatch("[0-9a-f]{32}", h) for h in hashes) and isinstance(layers, list)
            and all(isinstance(layer, list) and all(isinstance(t, torch.Tensor) for t in layer) for layer in layers)):
        return 0, f"{path}: not a qvl prompt cache"
    n = len(keys)
    let_go(model)  # the old cache's memory freed before the new one takes it (a failed restore: none kept)
    cache = model.decoder.new_cache(max(n, 1), model.placement.kv_type)
    stores = cache.k + cache.v
    if len(layers) != len(stores):
        return 0, f"{path}: holds {len(layers) // 2} layers, the model {len(stores) // 2}"
    for store, saved in zip(stores, layers):
        mine = parts(store)
        if len(saved) != len(mine) or any(a.dtype != b.dtype or a.shape[:1] + a.shape[2:] != b.shape[:1] + b.shape[2:]
                                          or b.shape[1] != n for a, b in zip(mine, saved)):
            return 0, f"{path}: its keys and values are not this cache's type or shape"
        for a, b in zip(mine, saved):
            a[:, :n] = b
    cache.length = n
    model.keep_prompt(cache, keys, hashes)
    return n, None
