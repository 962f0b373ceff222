"""`qvl serve`'s embeddings: Ollama's /api/embed (and its older /api/embeddings) and OpenAI's
/v1/embeddings. A text's embedding is its last token's final-norm hidden state (the decoder's
output before the vocabulary projection: llama.cpp's last-token pooling, the one Qwen-based
embedding models use), L2-normalized as Ollama's /api/embed and OpenAI's are (the older
/api/embeddings gives it as it is). The text is read as it is, no chat template; one longer than
the context is cut to its first num_ctx tokens (Ollama's `truncate`, true by default; false:
a 400). `dimensions` keeps the first N values, normalized again. A request's texts are read side
by side, up to PACK_TOKENS tokens a pass, each attending only to itself (last_hidden). Also
llama.cpp server's own /embedding and /embeddings (its reply's shape, its embd_normalize)."""

from __future__ import annotations

import base64
import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .decoder import PREFILL_CHUNK
from .kernel_failure import one_line
from .model import PLAN_CTX, Model
from .positions import Span, rope_positions
from .modelfile import ModelfileError, check_params
from .server import Loaded, Reply, RequestError, Service, _ns


PACK_TOKENS = PREFILL_CHUNK  # texts read side by side in one pass: up to a prefill pass's tokens


@torch.no_grad()
@one_line()  # a Triton kernel failing on the GPU: a KernelFailure (kernel_failure.py), as in Model
def last_hidden(model: Model, texts: list[list[int]]) -> torch.Tensor:
    """Each token list's last final-norm hidden state, (len(texts), n_embd) float32 on the CPU:
    the lists side by side in one pass of the decoder, each attending only to its own tokens
    (at positions from 0, as alone), so that the weights are read once for them all."""
    lengths = [len(ids) for ids in texts]
    embeds = model.decoder.embed_tokens(torch.tensor([t for ids in texts for t in ids], dtype=torch.long))
    positions = torch.cat([rope_positions([Span(n)]) for n in lengths], dim=1)
    cache = model.decoder.new_cache(sum(lengths), model.placement.kv_type)
    hidden = model.decoder.forward(embeds, positions, cache, segments=lengths)
    return hidden[[end - 1 for end in itertools.accumulate(lengths)]].float().cpu()


def packs(lengths: list[int], budget: int) -> list[list[int]]:
    """The texts' indexes in order, in runs of at most `budget` tokens (a longer text alone)."""
    out: list[list[int]] = []
    total = budget + 1
    for i, n in enumerate(lengths):
        if total + n > budget:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def embeddings_of(model: Model, texts: list[list[int]]) -> list[np.ndarray]:
    """Each token list's last final-norm hidden state: packed side by side (last_hidden), a list
    longer than a pack read alone in prefill passes (Model.token_hidden)."""
    out: list[np.ndarray] = [np.empty(0)] * len(texts)
    for pack in packs([len(ids) for ids in texts], PACK_TOKENS):
        t0 = time.perf_counter()
        if len(pack) == 1 and len(texts[pack[0]]) > PACK_TOKENS:
            out[pack[0]] = model.token_hidden(texts[pack[0]])[-1][-1].float().cpu().numpy()
        else:
            for i, row in zip(pack, last_hidden(model, [texts[i] for i in pack]).numpy()):
                out[i] = row
        model.usage.read([len(texts[i]) for i in pack], time.perf_counter() - t0)  # qvl serve's /metrics
    return out


def embedding(last: np.ndarray, normalize: bool, dimensions: int | None) -> list[float]:
    """A text's embedding from its last final-norm hidden state, as float32 values."""
    if dimensions is not None:
        last = last[:dimensions]
    if normalize:
        norm = float(np.linalg.norm(last))
        last = last / norm if norm > 0 else last
    return [float(v) for v in last]


def _context(loaded: Loaded, service: Service, options: Any) -> int:
    """The tokens a text may have: the request's num_ctx, the model's stored one, `qvl serve
    --ctx-size`, else PLAN_CTX."""
    if not isinstance(options, dict):
        raise RequestError(400, "options: a JSON object")
    try:
        merged = {**loaded.params, **check_params(options, strict=False)}
    except ModelfileError as e:
        raise RequestError(400, f"options: {e}") from None
    return merged.get("num_ctx") or service.config.ctx_size or PLAN_CTX


def _dimensions(value: Any, width: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= width:
        raise RequestError(400, f"dimensions {value!r}: 1 to the model's {width}")
    return value


def _token_ids(model: Model, item: Any, where: str) -> list[int]:
    """A text's token ids, or (OpenAI) a list of token ids as given."""
    if isinstance(item, str):
        if not item:
            raise RequestError(400, f"{where}: an empty text has no embedding")
        return model.tokenize(item, [])[0]
    vocab = model.cfg.n_vocab
    if (isinstance(item, list) and item and
            all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in item)):
        return item
    raise RequestError(400, f"{where}: a text (or a list of token ids below {vocab})")


def _embed_all(service: Service, body: dict[str, Any], texts: list[Any], normalize: bool,
               where: str) -> tuple[Loaded, list[list[float]], int]:
    """Each input's embedding, cut to the context unless `truncate` is false; (loaded, vectors,
    tokens read in all)."""
    loaded = service.use(body.get("model"), body.get("keep_alive"))
    ctx = _context(loaded, service, body.get("options") or {})
    dims = _dimensions(body.get("dimensions"), loaded.model.cfg.n_embd)
    truncate = body.get("truncate", True) is not False
    cut: list[list[int]] = []
    for i, item in enumerate(texts):
        ids = _token_ids(loaded.model, item, f"{where}[{i}]" if len(texts) > 1 else where)
        if len(ids) > ctx and not truncate:
            raise RequestError(400, f"{where}: {len(ids)} tokens, more than the context ({ctx}; "
                                    "truncate: true cuts it, or a larger num_ctx)")
        cut.append(ids[:ctx])
    vectors = [embedding(last, normalize, dims) for last in embeddings_of(loaded.model, cut)]
    return loaded, vectors, sum(len(ids) for ids in cut)


def _inputs(value: Any, where: str) -> list[Any]:
    """One input or a list of them (OpenAI: a list of ints is one input of token ids)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        return [value]
    if isinstance(value, list):
        return value
    raise RequestError(400, f"{where}: a text or a list of texts")


def embed(service: Service, body: dict[str, Any]) -> Reply:
    """Ollama's /api/embed: {"model", "input": text or [texts], "truncate", "dimensions",
    "options", "keep_alive"} -> {"embeddings": [[...]], "prompt_eval_count", durations}."""
    started = time.perf_counter()
    texts = [] if body.get("input") in (None, "") else _inputs(body.get("input"), "input")
    loaded, vectors, tokens = _embed_all(service, body, texts, True, "input")
    return Reply({"model": service._name(loaded), "embeddings": vectors,
                  "total_duration": _ns(time.perf_counter() - started), "load_duration": _ns(loaded.load_s),
                  "prompt_eval_count": tokens})


def embeddings(service: Service, body: dict[str, Any]) -> Reply:
    """Ollama's older /api/embeddings: {"model", "prompt"} -> {"embedding": [...]}, not normalized."""
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise RequestError(400, "prompt: a text")
    if not prompt:
        service.use(body.get("model"), body.get("keep_alive"))
        return Reply({"embedding": []})
    _, vectors, _ = _embed_all(service, body, [prompt], False, "prompt")
    return Reply({"embedding": vectors[0]})


def openai_embeddings(service: Service, body: dict[str, Any]) -> Reply:
    """OpenAI's /v1/embeddings: {"model", "input": text, [texts], [token ids] or [[token ids]],
    "encoding_format": float or base64, "dimensions"} -> {"data": [{"embedding", "index"}], "usage"}."""
    texts = _inputs(body.get("input"), "input")
    if not texts:
        raise RequestError(400, "input: a text or a list of texts")
    kind = body.get("encoding_format") or "float"
    if kind not in ("float", "base64"):
        raise RequestError(400, f"encoding_format {kind!r}: float or base64")
    loaded, vectors, tokens = _embed_all(service, body, texts, True, "input")
    spell: Callable[[list[float]], Any] = (
        (lambda v: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()) if kind == "base64"
        else (lambda v: v))
    return Reply({"object": "list", "model": service._name(loaded),
                  "data": [{"object": "embedding", "embedding": spell(v), "index": i} for i, v in enumerate(vectors)],
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _normalize_kind(body: dict[str, Any]) -> int:
    kind = body.get("embd_normalize", 2)
    if isinstance(kind, bool) or not isinstance(kind, int) or kind < -1:
        raise RequestError(400, f"embd_normalize {kind!r}: -1 (none), 0 (int16 range), 1, 2 (Euclidean) or p > 2")
    return kind


def normalized(v: list[float], kind: int) -> list[float]:
    """llama.cpp's common_embd_normalize: -1 as it is, 0 scaled to int16's range (largest
    |value| 32760), 2 Euclidean, any other p the p-norm (1: taxicab); sums in double."""
    x = np.asarray(v, dtype=np.float64)
    if kind == -1:
        total = 1.0
    elif kind == 0:
        total = float(np.abs(x).max(initial=0.0)) / 32760.0
    elif kind == 2:
        total = float(np.sqrt(np.sum(x * x)))
    else:
        total = float(np.sum(np.abs(x) ** kind) ** (1.0 / kind))
    scale = np.float32(1.0 / total if total > 0 else 0.0)
    return [float(f) for f in np.asarray(v, dtype=np.float32) * scale]


def llamacpp_embeddings(service: Service, body: dict[str, Any]) -> Reply:
    """llama.cpp server's own POST /embedding and /embeddings: {"content" (or "input"): a text,
    texts or token ids, "embd_normalize": 2} -> [{"index": i, "embedding": [[...]]}] (one
    vector a text: last-token pooling), each normalized as embd_normalize says."""
    key = "input" if "input" in body else "content"
    if key not in body:
        raise RequestError(400, '"input" or "content" must be provided')
    texts = _inputs(body.get(key), key)
    if not texts:
        raise RequestError(400, f"{key}: a text or a list of texts")
    kind = _normalize_kind(body)
    _, vectors, _ = _embed_all(service, body, texts, False, key)
    return Reply([{"index": i, "embedding": [normalized(v, kind)]} for i, v in enumerate(vectors)])


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("POST", "/api/embed"): embed,
    ("POST", "/api/embeddings"): embeddings,
    ("POST", "/v1/embeddings"): openai_embeddings,
    ("POST", "/embedding"): llamacpp_embeddings,
    ("POST", "/embeddings"): llamacpp_embeddings,
}
