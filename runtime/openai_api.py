"""`qvl serve`'s OpenAI endpoints: /v1/models, /v1/chat/completions (content parts "text" and
"image_url" as data: URLs, response_format, logprobs / top_logprobs) and /v1/completions (a
prompt continued as it is, no chat template; a string or token ids, or a list of them answered in
turn; logprobs and echo, so that prompts can be scored),
on server.Service's loaded model. `n` choices are made one after another, each with the seed one
more than the one before. Streams are server-sent events, each chunk with the logprobs of the
tokens scored since the one before; choices stream one after another, each chunk with its index.
As llama.cpp's server, both completions take `lora`: the request's run-time adapter scales (lora_api.py),
`cache_prompt` (false: the prompt read anew, not from the KV cache of the last answer),
and its samplers' fields: top_k, min_p, repeat_penalty, repeat_last_n, typical_p, top_n_sigma,
xtc_*, dynatemp_*, dry_*, mirostat*, adaptive_* and `samplers` (the order; qvl's, temperature first, unless
given: llamacpp_completion.request_chain), and post_sampling_probs: the log-probabilities from the
chain's distribution, a chat's in llama-server's fields (id, token, bytes, prob, top_probs). Replies
(a stream: its last chunk) carry llama-server's `timings` (generation.llama_timings); a stream asked
with llama-server's timings_per_token carries the timings so far on each chunk of text, and one
asked with return_progress a chunk of no text with prompt_progress {total, cache, processed,
time_ms} before the prompt is read, after each 2048 of its tokens and at its end (live.py)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

from .generation import Generation, llama_timings
from .live import PromptProgress, asks_progress
from .llamacpp_completion import (MAX_PROMPTS, check_ids, completion_probabilities, each_completion, prompt_text,
                                  request_chain, token_ids)
from .logprobs import Speller, TokenLogprob, entries, new_scores, prompt_logprobs, speller
from .request_messages import request_messages
from .server import (Loaded, Reply, RequestError, Service, _store_error, answer_format,
                     generation_options, top_logprobs, unsupported)
from .store import StoreError


def models(service: Service, body: dict[str, Any]) -> Reply:
    """The stored models, after the GGUF file qvl serve was given (by its --alias or file name), as
    llama-server lists its own."""
    return Reply({"object": "list", "data": _given(service) + [
        {"id": str(e.name), "object": "model", "created": int(e.modified), "owned_by": "library"}
        for e in service.store.list()]})


def _given(service: Service) -> list[dict[str, Any]]:
    name = service.default_file_name()
    if name is None:
        return []
    created = int(Path(str(service.config.default_model)).stat().st_mtime)
    return [{"id": name, "object": "model", "created": created, "owned_by": "qvl"}]


MODEL_PATH = "/v1/models/"  # GET /v1/models/NAME: one model (http_serve.py routes it)


def model(service: Service, body: dict[str, Any]) -> Reply:
    """A stored model (or the file qvl serve was given), as /v1/models lists it; 404 when there is
    none by that name."""
    given = _given(service)
    if given and body["model"] == given[0]["id"]:
        return Reply(given[0])
    try:
        entry = service.store.get(body["model"])
    except StoreError as e:
        raise _store_error(e) from None
    return Reply({"id": str(entry.name), "object": "model", "created": int(entry.modified), "owned_by": "library"})


def _options(loaded: Loaded, service: Service, body: dict[str, Any], default_tokens: int | None) -> dict[str, Any]:
    """Model.generate's keyword arguments from OpenAI's names over the stored parameters."""
    options = {k: body[k] for k in ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                                    "top_k", "min_p", "repeat_penalty", "repeat_last_n") if body.get(k) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens", default_tokens))
    if limit is not None:
        options["num_predict"] = limit
    kwargs = generation_options(loaded.params, options, service.config.ctx_size)
    if body.get("logit_bias") is not None:  # {"token id": bias}: Model.generate checks it
        if not isinstance(body["logit_bias"], dict):
            raise RequestError(400, "logit_bias: a map of token ids to biases")
        kwargs["logit_bias"] = body["logit_bias"]
    chain = request_chain(body, None, kwargs.get("chain"))  # llama-server's samplers, qvl's order
    kwargs["chain"] = replace(chain, post_sampling_probs=bool(body.get("post_sampling_probs")))
    kwargs["cache_prompt"] = bool(body.get("cache_prompt", True))  # llama-server's: false reads the prompt anew
    if body.get("ignore_eos"):  # llama.cpp server's and vLLM's: the end-of-turn tokens never chosen
        kwargs["logit_bias"] = {**kwargs.get("logit_bias", {}), **{str(t): float("-inf") for t in loaded.model.stop_ids}}
    return kwargs


Choice = Callable[[str, "str | None", bool], dict[str, Any]]  # (text, finish reason, first chunk) -> a choice


def _answer(service: Service, loaded: Loaded, runs: list[Callable[[], tuple[Iterator[str], Choice]]],
            body: dict[str, Any], kind: str, prompt_of: list[int] | None = None) -> Reply:
    """A chat.completion / text_completion reply, or its stream of chunks, of `runs` (one a choice,
    made one after another on the model's one cache): each starts a generation and gives its
    pieces and `choice(text, reason, first)`, a choice (a chunk's when streaming) with that text.
    `prompt_of`: each run's prompt (several prompts: /v1/completions'), whose tokens count once."""
    name, created = service._name(loaded), int(time.time())
    cid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{next(service._ids)}"
    counts = {"prompt_tokens": 0, "completion_tokens": 0}
    cached: dict[int, int] = {}  # each prompt's tokens the KV cache held when its first run began
    last: list[Generation] = []
    prompt_of = prompt_of or [0] * len(runs)

    def finish(i: int) -> str:  # run i's, just made; its tokens counted
        g = loaded.model.last_generation
        assert g is not None
        last[:] = [g]
        if prompt_of[i] not in cached:
            counts["prompt_tokens"] += g.prompt_tokens
            cached[prompt_of[i]] = g.reused_tokens
        counts["completion_tokens"] += len(g.token_ids)
        return "stop" if g.ended else "length"

    def usage() -> dict[str, Any]:
        return {**counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    if not body.get("stream", False):
        choices = []
        for i, run in enumerate(runs):
            pieces, choice = run()
            text = "".join(pieces)
            choices.append(choice(text, finish(i), False))
        return Reply({"id": cid, "object": kind, "created": created, "model": name, "choices": choices,
                      "usage": usage(), "timings": llama_timings(last[0])})  # llama-server's, the last choice's

    def chunk(parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": cid, "object": f"{kind}.chunk" if kind == "chat.completion" else kind, "created": created,
                "model": name, "choices": parts}

    stream_options = body.get("stream_options")
    with_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))

    per_token = bool(body.get("timings_per_token"))

    def events() -> Iterator[dict[str, Any]]:
        for i, run in enumerate(runs):
            pieces, choice = run()
            if kind == "chat.completion":
                yield chunk([choice("", None, True)])
            for piece in pieces:
                if isinstance(piece, PromptProgress):  # llama-server's: a chat's with its role again
                    out = {**chunk([choice("", None, kind == "chat.completion")]), "prompt_progress": piece.to_json()}
                else:
                    out = chunk([choice(piece, None, False)])
                yield {**out, "timings": loaded.model.live.timings()} if per_token else out
            end = chunk([choice("", finish(i), False)])
            yield end if with_usage or i + 1 < len(runs) else {**end, "timings": llama_timings(last[0])}
        if with_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
            yield {**chunk([]), "usage": usage(), "timings": llama_timings(last[0])}

    return Reply(events=events(), sse=True)


def chat_input_tokens(service: Service, body: dict[str, Any]) -> Reply:
    """llama.cpp server's POST /v1/chat/completions/input_tokens: the prompt tokens a chat
    completion of the same body would read (pictures' included), nothing run."""
    loaded = service.use(body.get("model"))
    count = loaded.model.count_chat_tokens(conversation(service, loaded, body))
    return Reply({"object": "response.input_tokens", "input_tokens": count})


def conversation(service: Service, loaded: Loaded, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat request's messages, the stored system message first where they have none (tools refused)."""
    unsupported({"tools": body.get("tools")}, service._name(loaded))
    return loaded.with_system(request_messages(body.get("messages"), None, service.config.media))


def chat(service: Service, body: dict[str, Any]) -> Reply:
    loaded = service.use(body.get("model"), lora=body.get("lora"))
    messages = conversation(service, loaded, body)
    each = each_completion(body.get("n", 1), "n", _options(loaded, service, body, None), loaded.model.defaults)
    top = top_logprobs(body.get("top_logprobs") or 0, "top_logprobs") if body.get("logprobs") else None
    form = answer_format(body)
    streaming = bool(body.get("stream", False))
    progress = asks_progress(body)  # llama-server's return_progress

    def run(index: int) -> tuple[Iterator[str], Choice]:
        pieces = loaded.model.chat(messages, stream=True, format=form, logprobs=top, progress=progress, **each[index])
        piece, sent = speller(loaded.model.tokenizer), [0]
        # llama-server's post_sampling_probs: the chain's probabilities, in its fields (id, prob, top_probs)
        listed = (partial(completion_probabilities, post_sampling=True) if body.get("post_sampling_probs")
                  else entries)

        def choice(text: str, reason: str | None, first: bool) -> dict[str, Any]:
            scores = None
            if top is not None and not streaming:
                g = loaded.model.last_generation
                assert g is not None and g.logprobs is not None
                scores = {"content": listed(piece, g.logprobs)}
            elif top is not None and not first and (new := new_scores(loaded.model, sent)):
                scores = {"content": listed(piece, new)}  # a chunk's: the tokens scored since the last chunk
            if not streaming:
                return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": scores,
                        "finish_reason": reason}
            delta = {"role": "assistant", "content": ""} if first else {} if reason else {"content": text}
            return {"index": index, "delta": delta, "logprobs": scores, "finish_reason": reason}

        return pieces, choice

    return _answer(service, loaded, [partial(run, i) for i in range(len(each))], body, "chat.completion")


COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions


def prompts(value: Any, model: Any) -> list[str | list[int]]:
    """OpenAI's completions prompt: a string, token ids (llama-server's: mixed with texts too), or a
    list of up to MAX_PROMPTS of either: several prompts, answered in turn; token ids checked
    before any is answered (Model.tokenize's ModelError)."""
    out: list[str | list[int]]
    if isinstance(value, str):
        out = [value]
    elif (ids := token_ids(value, model.tokenizer)) is not None:
        out = [ids]
    elif not isinstance(value, list) or not 0 < len(value) <= MAX_PROMPTS:
        raise RequestError(400, f"prompt: a string, token ids, or a list of 1 to {MAX_PROMPTS} of them")
    else:
        out = []
        for i, p in enumerate(value):
            one = p if isinstance(p, str) else token_ids(p, model.tokenizer)
            if one is None:
                raise RequestError(400, f"prompt[{i}]: a string or token ids")
            out.append(one)
    check_ids(out, model)
    return out


def complete(service: Service, body: dict[str, Any]) -> Reply:
    """The legacy completions: each prompt continued as it is (no chat template, no system prompt),
    its `n` choices one after another, the choices of prompt k at indexes k * n ... k * n + n - 1."""
    loaded = service.use(body.get("model"), lora=body.get("lora"))
    model = loaded.model
    asked = prompts(body.get("prompt", ""), model)
    said = [prompt_text(p, model.tokenizer) for p in asked]
    for key in ("suffix", "best_of"):
        if body.get(key) not in (None, 1, ""):
            raise RequestError(400, f"{key}: not supported by qvl serve")
    top = None if body.get("logprobs") is None else top_logprobs(body["logprobs"], "logprobs")
    echo = bool(body.get("echo", False))
    if echo and body.get("stream", False):
        raise RequestError(400, "echo: not with stream")
    kwargs = _options(loaded, service, body, COMPLETION_TOKENS)
    each = each_completion(body.get("n", 1), "n", kwargs, model.defaults)
    # echo: each prompt's own tokens scored first (a separate pass over it, every position's logits)
    scored = [prompt_logprobs(model, p, top or 0) if echo and top is not None else ([], []) for p in asked]
    if echo and kwargs["max_new_tokens"] == 0:  # scoring only, as lm-evaluation-harness asks
        lengths = [len(ids or model.tokenize(p, [])[0]) for p, (ids, _) in zip(asked, scored)]
        return Reply({"id": f"cmpl-{next(service._ids)}", "object": "text_completion", "created": int(time.time()),
                      "model": service._name(loaded),
                      "choices": [{"index": k, "text": said[k], "finish_reason": "length",
                                   "logprobs": _legacy(speller(model.tokenizer), *scored[k]) if top is not None
                                   else None} for k in range(len(asked))],
                      "usage": {"prompt_tokens": sum(lengths), "completion_tokens": 0, "total_tokens": sum(lengths)}})
    form = answer_format(body)
    streaming = bool(body.get("stream", False))
    progress = asks_progress(body)  # llama-server's return_progress

    def run(k: int, index: int) -> tuple[Iterator[str], Choice]:
        pieces = model.generate(asked[k], stream=True, template=False, format=form, logprobs=top, progress=progress,
                                **each[index])
        piece, sent, offset = speller(model.tokenizer), [0], [0]
        prompt_ids, prompt_scores = scored[k]

        def choice(text: str, reason: str | None, first: bool) -> dict[str, Any]:
            scores = None
            if top is not None and not streaming:
                g = model.last_generation
                assert g is not None and g.logprobs is not None
                scores = _legacy(piece, prompt_ids + g.token_ids, prompt_scores + list(g.logprobs))
            elif top is not None and (new := new_scores(model, sent)):  # a chunk's, text_offset running on
                scores = _legacy(piece, [s.token for s in new], list(new), offset[0])
                offset[0] = scores["text_offset"][-1] + len(scores["tokens"][-1])
            return {"index": k * len(each) + index, "text": (said[k] if echo else "") + text, "logprobs": scores,
                    "finish_reason": reason}

        return pieces, choice

    runs = [(k, i) for k in range(len(asked)) for i in range(len(each))]
    return _answer(service, loaded, [partial(run, k, i) for k, i in runs], body, "text_completion",
                   [k for k, _ in runs])


def _legacy(piece: Speller, ids: list[int], scores: list[TokenLogprob | None],
            start: int = 0) -> dict[str, Any]:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs, text_offset (from `start`)."""
    tokens = [piece(t)[0] for t in ids]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=start)) if tokens else []
    return {"tokens": tokens, "token_logprobs": [None if s is None else s.logprob for s in scores],
            "top_logprobs": [None if s is None else {piece(i)[0]: v for i, v in s.top} for s in scores],
            "text_offset": offsets}


ROUTES: dict[tuple[str, str], Callable[[Service, dict[str, Any]], Reply]] = {
    ("GET", "/v1/models"): models,
    ("POST", "/v1/chat/completions"): chat,
    ("POST", "/v1/completions"): complete,
    ("POST", "/v1/chat/completions/input_tokens"): chat_input_tokens,
    # llama.cpp server's paths without /v1, for clients whose base URL lacks it
    ("GET", "/models"): models,
    ("POST", "/chat/completions"): chat,
    ("POST", "/chat/completions/input_tokens"): chat_input_tokens,
}
