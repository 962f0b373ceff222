"""The Model: prompts with images -> logits, generation, chat.

A prompt is a chat turn rendered with the model's own template; each image becomes one pad per merged patch
between <|vision_start|> and <|vision_end|>, the pads' embeddings replaced by the vision tower's output, positions
M-RoPE's (`positions.py`). Torch on the CPU; on a GPU (placement.py) the Triton kernels, decode in a CUDA graph."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import fit, prefill_oom, vision_oom
from .chat import chat_media, media_order, render, user_content, with_stored
from .config import TextConfig, text_config
from .decode_graph import DecodeGraph
from .decoder import PREFILL_CHUNK, Decoder, KVCache
from .generation import Generation
from .gguf_file import GGUFFile
from .image import MAX_PIXELS, MIN_PIXELS
from .json_format import JsonConstraint, TokenTable, format_grammar, token_table
from .json_grammar import Grammar
from .kernel_failure import one_line, one_line_items
from .live import PROGRESS_TOKENS, Live, PromptProgress
from .lora import LoraSource, load_adapters
from .media_input import read_pictures, read_videos
from .logprobs import TokenLogprob, token_logprob
from .placement import (CUDA_OVERHEAD, PATCH_PIXELS, Placement, PlacementError, Plan, dequant_slab_bytes, footprint,
                        indexed, make_plan)
from .positions import Span, rope_positions
from .prompt_cache import MediaSpan, PromptKeys
from .sampling import (ChainOptions, FormatError, SamplingError, SamplingParams, drawn_from, sample, sample_allowed,
                       sampling_params)
from .speculative import DraftPrompt, Drafter, Drafts, Speculation
from .tokenizer import StopStrings, TextStream, tokenizer_from_gguf
from .usage import DraftCounts, Usage
from .video import VideoInput, VideoOptions
from .vision import VisionConfig, VisionTower, vision_config
from .vision_cache import VisionCache, cached_features
from .weights import EXACT, PACKED, STREAMED, Weights

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
_PADS = re.compile(r"(<\|image_pad\|>|<\|video_pad\|>)")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
PLAN_CTX = 4096  # the context a GPU plan reserves KV cache for, and an open-ended answer's, when none is given


class ModelError(ValueError):
    """A model that cannot be loaded or a request it cannot serve; one line, names the file."""


ImageLike = str | Path | Image.Image


class Model:
    def __init__(self, text_file: GGUFFile, vision_file: GGUFFile | None, fast: bool = True, placement: Placement =
                 Placement(), max_vram: int | None = None, plan_ctx: int = PLAN_CTX, lora: Sequence[LoraSource] = ()):
        """fast: bf16 matmuls on non-F32 CPU weights (False: float32 throughout). `placement` puts layers and the
        vision tower on an accelerator; with `max_vram` (bytes) a plan for a `plan_ctx`-token cache decides how
        many layers and whether the vision tower go there. `lora`: run-time adapters (lora.py)."""
        self.text_file = text_file
        self.files = [text_file] + ([vision_file] if vision_file is not None and vision_file is not text_file else [])
        self.cfg: TextConfig = text_config(text_file)
        self.tokenizer = tokenizer_from_gguf(text_file)
        self.chat_template: str | None = text_file.get("tokenizer.chat_template")
        self.plan: Plan | None = None
        self.fit_note: str | None = None  # what placement.fit_free changed, for the CLI to print
        self.adapters = load_adapters(lora, text_file.tensors)  # their scales may change (lora.py)
        loras = self.adapters.factors
        if placement.accel is not None:
            fp = footprint(self.cfg, text_file.tensors, vision_file.tensors if vision_file else None,
                           placement.kernels, placement.kv_type or "bf16",
                           dequant_slab_bytes(placement.accel, placement.kernels, fast), half=fast, loras=loras)

            def plan_for(budget: int | None) -> Plan:
                return make_plan(fp, plan_ctx, budget, placement.gpu_layers, placement.vision_on_accel,
                                 placement.vision_max_pixels, placement.vision_stream, placement.prefill_offload)

            self.plan = plan_for(max_vram)
            free = fit.free_bytes(placement.accel) if max_vram is None and placement.fit_free else None
            if free is not None and self.plan.total > free:
                asked = self.plan
                try:
                    self.plan, max_vram = plan_for(free), free
                except PlacementError:  # not even the context and activations: nothing goes there
                    self.plan, placement = None, Placement(kv_type=placement.kv_type)
                self.fit_note = fit.note(asked, free, self.plan)
            elif free is not None and self.plan.vision_on_gpu:  # it fits: images too large for what is left
                # are downscaled, not out of memory (the kept cache may stay through an encode: counted)
                rest = CUDA_OVERHEAD + self.plan.weights + self.plan.dequant_slab + self.plan.kv
                pixels = max(0, int((free - rest) / fp.vision_bytes_per_pixel))
                placement = replace(placement, vision_max_pixels=min(pixels, placement.vision_max_pixels or pixels))
                self.plan = plan_for(None)
            if max_vram is not None and self.plan is not None:
                placement = replace(placement, gpu_layers=self.plan.gpu_layers, vision_on_accel=self.plan.vision_on_gpu,
                                    vision_max_pixels=self.plan.vision_max_pixels,
                                    vision_stream=self.plan.vision_streamed, copy_ahead=self.plan.copies_ahead)
        self.placement = placement
        self.on_warning: Callable[[str], None] = warnings.warn  # the CLI prints these on stderr
        accel = indexed(torch.device(placement.accel)) if placement.accel is not None else None
        self.decoder = Decoder(self.cfg, Weights(text_file, mode=PACKED if fast else EXACT, loras=loras), accel,
                               placement.gpu_layers, placement.kernels, placement.prefill_offload, placement.copy_ahead)
        self.vision_cfg: VisionConfig | None = None
        self.vision: VisionTower | None = None
        if vision_file is not None:
            self.vision_cfg = vision_config(vision_file)
            on_accel = accel if placement.vision_on_accel else None
            self.vision = VisionTower(self.vision_cfg, Weights(vision_file, mode=STREAMED if fast else EXACT),
                                      on_accel, placement.kernels, placement.vision_stream and on_accel is not None)
        self.vision_cache = VisionCache()  # pictures' features seen lately (vision_cache.py)
        self._graph: DecodeGraph | None = None  # the last generation's cache and captured decode step
        self._kept: KVCache | None = None  # without a graph: the last generation's cache, for the next
        self._prompt_keys = PromptKeys()  # what the kept cache holds (prompt_cache.py)
        self.cache_pool: Any = None  # qvl serve's CachePool: other conversations' caches (cache_pool.py)
        self._generation = 0  # counts generations: a stale one neither continues nor records its cache
        self.last_generation: Generation | None = None  # a finished stream's Generation (_pieces)
        self.scored: list[TokenLogprob] = []  # with logprobs=: the tokens' so far, while a stream runs
        self.live = Live()  # while a stream runs: its prompt's tokens, the answer's ids so far, its times (live.py)
        self.usage = Usage()  # generations' and embeddings' token counts and times (usage.py; serve's /metrics)
        self.defaults: dict[str, Any] = {}  # generate's defaults (a stored model's PARAMETERs, SYSTEM): loader.py
        self.image_pad_id, self.video_pad_id = (self.tokenizer.token_to_id(pad) for pad in (IMAGE_PAD, VIDEO_PAD))
        self.stop_ids = {i for t in STOP_TOKENS if (i := self.tokenizer.token_to_id(t)) is not None}
        self._token_table: TokenTable | None = None  # format="json"'s view of the vocabulary, made once
        self.speculation: Speculation | None = None  # drafts from the text itself (--spec-type; speculative.py)
        self.drafter = Drafter()  # ngram-mod's table, ngram-map's keys: kept across answers, as llama-server's

    def messages_for(self, prompt: str, n_images: int, system: str | None = None, n_videos: int = 0) -> list[dict]:
        """A user turn with images then videos first, or where `{image1}` / `{video1}`... say,
        after the system prompt and the stored conversation (`defaults["messages"]`) if any."""
        try:
            content = user_content(prompt, n_images, n_videos)
        except ValueError as e:
            raise ModelError(str(e)) from None
        messages = [{"role": "system", "content": system}] if system else []
        return messages + list(self.defaults.get("messages", [])) + [{"role": "user", "content": content}]

    def _images(self, images: list[ImageLike], min_pixels: int, max_pixels: int):
        self._seeing(images, "images")
        return read_pictures(images, self.vision_cfg, min_pixels, max_pixels, self.placement.vision_max_pixels,
                             self.on_warning) if images else []

    def _videos(self, videos: list[str | Path], opts: VideoOptions) -> list[VideoInput]:
        self._seeing(videos, "videos")
        return read_videos(videos, self.vision_cfg, opts, self.placement.vision_max_pixels,
                           self.on_warning) if videos else []

    def _seeing(self, media: list[Any], what: str) -> None:
        if media and self.vision_cfg is None:
            raise ModelError(f"{self.text_file.path}: this model has no vision projector (mmproj); "
                             f"{what} need one (pass --mmproj)")

    def tokenize(self, text: str | list[int], images: list[ImageLike], min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, videos: list[VideoInput] | None = None
                 ) -> tuple[list[int], list[Span], list]:
        """Rendered prompt (one pad per image / video) -> ids with pads expanded, spans, images; token ids as given."""
        if not isinstance(text, str):  # llama-server's token-id prompts: no pictures, no pads
            pads = (self.image_pad_id, self.video_pad_id)
            if not text or images or videos or any(not 0 <= t < self.cfg.n_vocab or t in pads for t in text):
                raise ModelError(f"a prompt of token ids: 1 or more of 0 to {self.cfg.n_vocab - 1}, no picture's "
                                 "pad, no pictures")
            return list(text), [Span(len(text))], []
        pre = self._images(images, min_pixels, max_pixels)
        videos = list(videos or [])
        pieces = _PADS.split(text)
        n_img = sum(1 for p in pieces if p == IMAGE_PAD)
        n_vid = sum(1 for p in pieces if p == VIDEO_PAD)
        if n_img != len(pre) or n_vid != len(videos):
            raise ModelError(f"prompt has {n_img} image and {n_vid} video slots for "
                             f"{len(pre)} image(s) and {len(videos)} video(s)")
        ids: list[int] = []
        spans: list[Span] = []
        it_img, it_vid = iter(pre), iter(videos)
        for piece in pieces:
            if piece in (IMAGE_PAD, VIDEO_PAD):
                item = next(it_img) if piece == IMAGE_PAD else next(it_vid)
                t, h, w = item.grid_thw
                n = t * (h // 2) * (w // 2)
                interval = 1.0
                if piece == VIDEO_PAD and self.vision_cfg is not None and self.vision_cfg.qwen2_5:
                    # float32 as transformers computes tokens_per_second * second_per_grid_t
                    interval = float(torch.tensor(item.second_per_grid_t, dtype=torch.float32)
                                     * self.vision_cfg.tokens_per_second)
                ids += [self.tokenizer.token_to_id(piece)] * n
                spans.append(Span(n, grid=(t, h // 2, w // 2), interval=interval))
            else:
                t_ids = self.tokenizer.encode(piece, add_special_tokens=False).ids
                ids += t_ids
                spans.append(Span(len(t_ids)))
        return ids, spans, pre

    def encode(self, text: str, images: list[ImageLike], min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS, videos: list[VideoInput] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Rendered prompt text (one pad per image / video) -> (embeddings, positions, timings)."""
        videos = list(videos or [])
        ids, spans, pre = self.tokenize(text, images, min_pixels, max_pixels, videos)
        embeds, timings = self._embed(ids, self._media(ids, spans, pre, videos), 0)
        return embeds, rope_positions(spans), timings

    def _media(self, ids: list[int], spans: list[Span], pre: list, videos: list[VideoInput]) -> list[MediaSpan]:
        """The prompt's pictures and videos in order, each with its run of pad tokens."""
        out: list[MediaSpan] = []
        it_img, it_vid = iter(pre), iter(videos)
        start = 0
        for span in spans:
            if span.grid is not None:
                video = ids[start] != self.image_pad_id
                item = next(it_vid) if video else next(it_img)
                out.append(MediaSpan(start, span.length, video, item.pixels, tuple(item.grid_thw)))
            start += span.length
        return out

    def _embed(self, ids: list[int], media: list[MediaSpan], start: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Embeddings of prompt tokens `start`.. (never inside a picture), the vision tower run on its pictures."""
        timings: dict[str, float] = {}
        ids_t = torch.tensor(ids[start:], dtype=torch.long)
        embeds = self.decoder.embed_tokens(ids_t)
        for video, pad in ((False, IMAGE_PAD), (True, VIDEO_PAD)):
            items = [m for m in media if m.video == video and m.start >= start]
            if not items:
                continue
            assert self.vision is not None
            t0 = time.perf_counter()
            feats = cached_features(items, self.vision_cache, embeds.device, lambda todo: torch.cat(
                [self._encode(batch).to(embeds.device) for batch in self._encode_batches(todo)]))  # waits for it
            timings["vision_ms"] = timings.get("vision_ms", 0.0) + 1e3 * (time.perf_counter() - t0)
            embeds[ids_t == self.tokenizer.token_to_id(pad)] = feats
        return embeds, timings

    def _encode(self, batch: list[MediaSpan]) -> torch.Tensor:
        """The vision tower's features of a batch of media; out of GPU memory, a VisionOutOfMemory."""
        assert self.vision is not None
        vision = self.vision
        pixels = np.concatenate([m.pixels for m in batch])
        return vision_oom.encode(lambda: vision.forward(torch.from_numpy(pixels), [m.grid_thw for m in batch]),
                                 pixels.shape[0] * PATCH_PIXELS)

    def _lower_vision_limit(self, error: vision_oom.VisionOutOfMemory, min_pixels: int) -> None:
        """After an encode ran out of GPU memory: pictures limited to fewer pixels from now on
        (vision_oom.py), with a warning; the error raised again where the limit cannot go lower."""
        limit = vision_oom.lowered(self.placement.vision_max_pixels, error.pixels, min_pixels)
        if limit is None:
            raise error
        self.on_warning(f"the vision tower ran out of GPU memory on {error.pixels:,} pixels: pictures are "
                        f"now limited to {limit:,} pixels, and the prompt is read again")
        self.placement = replace(self.placement, vision_max_pixels=limit)

    def _encode_batches(self, items: list[MediaSpan]) -> list[list[MediaSpan]]:
        """The media encoded together, in order: all at once, or under a memory limit (placement.vision_max_pixels,
        which each was fitted to alone) as many at a time as it holds: a prompt's pictures take no more than one may."""
        limit = self.placement.vision_max_pixels
        if limit is None:
            return [items]
        batches: list[list[MediaSpan]] = [[]]
        size = 0
        for m in items:
            pixels = m.pixels.shape[0] * PATCH_PIXELS
            if batches[-1] and size + pixels > limit:
                batches.append([])
                size = 0
            batches[-1].append(m)
            size += pixels
        return batches

    def _prefill_hidden(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> list[torch.Tensor]:
        start = cache.length
        return prefill_oom.retrying(lambda: self.decoder.prompt_forward(embeds, positions, cache, PREFILL_CHUNK),
                                    self.decoder, partial(setattr, cache, "length", start), self.on_warning)

    def _prefill(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, all_logits: bool) -> torch.Tensor:
        hidden = self._prefill_hidden(embeds, positions, cache)
        if all_logits:
            return torch.cat([self.decoder.logits(h) for h in hidden])
        return self.decoder.logits(hidden[-1][-1:])

    def _let_cache_go(self, capacity: int, reuse: int, always: bool) -> KVCache | None:
        """Before a generation's media are encoded: the kept cache stays when it holds `capacity` tokens
        (unless `always`); otherwise its first `reuse` tokens are copied to host memory (returned, or None)
        and it is let go: the vision tower's work and the old and new caches never take accelerator memory
        at once (placement.py's plan counts the vision tower's peak or the cache, not both)."""
        old = self._graph.cache if self._graph is not None else self._kept
        if old is None or (old.capacity >= capacity and not always):
            return None
        staged = None
        if reuse:
            staged = KVCache(self.cfg, reuse, None, self.placement.kv_type)
            staged.take_prefix(old, reuse)
        self._graph = self._kept = None
        return staged

    def _generation_cache(self, capacity: int, reuse: int, staged: KVCache | None) -> KVCache:
        """A cache for one generation holding the first `reuse` tokens of the kept cache, or after `_let_cache_go`
        of `staged`, kept for the next. A decoder wholly on the accelerator decodes through a DecodeGraph."""
        old = self._graph.cache if self._graph is not None else self._kept
        if old is not None:  # _let_cache_go kept it: it holds `capacity`
            old.length = reuse
            return old
        cache = self.decoder.new_cache(capacity, self.placement.kv_type)
        if staged is not None:
            cache.take_prefix(staged, reuse)
        if DecodeGraph.supports(self.decoder):
            self._graph = DecodeGraph(self.decoder, cache, self.placement.cuda_graph, lambda m: self.on_warning(m))
        else:
            self._kept = cache
        return cache

    def kept_prompt(self) -> tuple[KVCache | None, list[int], list[str]]:
        """The last generation's cache (its queued step done), its PromptKeys.export and pictures' hashes."""
        if self._graph is not None:
            self._graph.drain()
        return (self._graph.cache if self._graph is not None else self._kept, *self._prompt_keys.export())

    def keep_prompt(self, cache: KVCache, keys: list[int], hashes: list[str]) -> None:
        """Take `cache`, holding kept_prompt's `keys` and `hashes`, as the last generation's."""
        if self._graph is not None:
            self._graph.drain()  # a step the last generation queued ahead
        self._graph, self._kept = None, cache
        self._prompt_keys.adopt(keys, hashes)

    def _vision_planned_alone(self) -> bool:
        """Whether a --max-vram plan counted the vision tower's (on the accelerator) peak instead of the KV cache."""
        return (self.plan is not None and self.plan.budget is not None and self.vision is not None
                and self.vision.device.type != "cpu")

    def _decode(self, cache: KVCache, tokens: list[int], position: int) -> torch.Tensor:
        """Logits (len(tokens), vocab) after each of `tokens`, text tokens from `position`, in one pass
        (one token: the captured step where the cache is the graph's)."""
        if len(tokens) == 1 and self._graph is not None and self._graph.cache is cache:
            return self._graph.step(tokens[0], position)
        embedding = self.decoder.embed_tokens(torch.tensor(tokens))
        pos = torch.arange(position, position + len(tokens)).expand(3, -1).contiguous()
        return self.decoder.logits(self.decoder.forward(embedding, pos, cache))

    def _prepare(self, prompt: str | list[int], images: list[ImageLike] | None, videos: list[str | Path] | None,
                 video_options: VideoOptions, system: str | None,
                 template: bool) -> tuple[str | list[int], list[ImageLike], list[VideoInput]]:
        """The rendered prompt and the media in the order its slots use them."""
        images = list(images or [])
        vids = self._videos(list(videos or []), video_options)
        if not template:
            return prompt, images, vids
        text = render(self.chat_template, self.messages_for(prompt, len(images), system, len(vids)))
        return text, media_order(prompt, images, "image"), media_order(prompt, vids, "video")

    @torch.no_grad()
    @one_line()  # a Triton kernel failing on the GPU: a KernelFailure (kernel_failure.py), as in generate
    def prompt_logits(self, prompt: str, images: list[ImageLike] | None = None, *, template: bool = True,
                      min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                      videos: list[str | Path] | None = None,
                      video_options: VideoOptions = VideoOptions()) -> torch.Tensor:
        """float32 logits (n_prompt_tokens, vocab) of every prompt position."""
        text, images, vids = self._prepare(prompt, images, videos, video_options, None, template)
        embeds, positions, _ = self.encode(text, images, min_pixels, max_pixels, vids)
        cache = self.decoder.new_cache(embeds.shape[0], self.placement.kv_type)
        return self._prefill(embeds, positions, cache, all_logits=True)

    @torch.no_grad()
    @one_line()
    def token_hidden(self, ids: list[int], cache: KVCache | None = None) -> list[torch.Tensor]:
        """Text tokens' final-norm hidden states, every position's, in prefill chunks (decoder.logits makes a
        slice's logits); with a `cache` holding ids' first cache.length tokens, those of the tokens after them."""
        cache = cache if cache is not None else self.decoder.new_cache(len(ids), self.placement.kv_type)
        embeds, _ = self._embed(ids, [], cache.length)
        return self._prefill_hidden(embeds, rope_positions([Span(len(ids) - cache.length)], cache.length), cache)

    def generate(self, prompt: str | list[int], images: list[ImageLike] | None = None, *,
                 max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, repeat_penalty: float | None = None, repeat_last_n: int | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 logit_bias: dict[int, float] | None = None, seed: int | None = None, stream: bool = False,
                 system: str | None = None, template: bool = True,
                 ctx_size: int | None = None, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 videos: list[str | Path] | None = None, video_options: VideoOptions = VideoOptions(),
                 cache_prompt: bool = True, stop: list[str] | None = None,
                 format: str | dict[str, Any] | Grammar | None = None,
                 logprobs: int | None = None, chain: ChainOptions | None = None,
                 progress: bool = False) -> Generation | Iterator[str | PromptProgress]:
        """An answer to `prompt` (a user turn, in the chat template unless `template` is False: then token ids, too)
        about `images` and `videos`: a Generation, or with `stream` an iterator of text pieces. With `cache_prompt` the
        prompt's start that the last generation's KV cache holds is not read again (Generation.reused_tokens). The
        answer ends before the first of the `stop` strings it comes to (Generation.ended). `format` "json" keeps the
        answer to one JSON object, a JSON schema (a dict) to what it allows (json_format.py), a Grammar (gbnf.parse_gbnf
        of llama.cpp's GBNF) to its root rule. `logprobs` (N alternatives): each token's log-probability
        (Generation.logprobs). `logit_bias` {token id: bias} is added to those tokens' logits (-inf bans one). An
        argument left None takes `self.defaults`' value (a stored model's PARAMETERs and SYSTEM), else the built-in one:
        512 new tokens, no repeat penalty over the last 64, seed 299792458, greedy (temperature 0 / top_k 0 / top_p 1 /
        min_p 0 turn a stored sampler off). `chain`: the sampler order and llama.cpp's other samplers (ChainOptions).
        `progress` (with `stream`): PromptProgress items among the pieces as the prompt is read (return_progress)."""
        d = self.defaults
        ctx_size, system, stop = (v if v is not None else d.get(k)
                                  for k, v in (("ctx_size", ctx_size), ("system", system), ("stop", stop)))
        max_new_tokens = max_new_tokens if max_new_tokens is not None else d.get("max_new_tokens", 512)
        if max_new_tokens < 0:
            raise ModelError(f"max_new_tokens {max_new_tokens}: 0 or more")
        if ctx_size is not None and ctx_size < 0:
            raise ModelError(f"ctx_size {ctx_size}: 0 (the prompt plus max_new_tokens) or more")
        if logprobs is not None and not 0 <= logprobs <= self.cfg.n_vocab:
            raise ModelError(f"logprobs {logprobs}: 0 to {self.cfg.n_vocab} alternatives")
        try:
            grammar = None if format is None else format_grammar(format, self.tokenizer)
        except ValueError as e:
            raise ModelError(str(e)) from None
        try:
            params = sampling_params(d, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                             repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                             logit_bias=logit_bias, chain=chain), self.cfg.n_vocab, self.tokenizer)
        except SamplingError as e:
            raise ModelError(str(e)) from None
        if not isinstance(prompt, str):  # token ids: checked at once
            if template:
                raise ModelError("a prompt of token ids is read as it is (template=False)")
            self.tokenize(prompt, list(images or []), videos=list(videos or []))  # type: ignore[arg-type]
        first = [self._prepare(prompt, images, videos, video_options, system, template)]  # its errors at once

        def attempt() -> Iterator[str | Generation]:  # again, with pictures downscaled, after an encode's OOM
            text, media, vids = first.pop() if first else self._prepare(prompt, images, videos, video_options,
                                                                        system, template)
            return self._run(text, media, max_new_tokens, params, ctx_size, min_pixels, max_pixels, vids, cache_prompt,
                             StopStrings(stop or []), None if grammar is None else self._json_constraint(grammar),
                             logprobs)

        it = one_line_items(vision_oom.retrying(attempt, lambda e: self._lower_vision_limit(e, min_pixels)))
        if stream:
            return self._pieces(it, progress)
        result = None
        for item in it:
            if isinstance(item, Generation):
                result = item
        assert result is not None
        return result

    def _json_constraint(self, grammar: Grammar) -> JsonConstraint:
        if self._token_table is None:
            self._token_table = token_table(self.tokenizer, self.cfg.n_vocab)
        return JsonConstraint(self._token_table, self.stop_ids, grammar)

    def _pieces(self, items: Iterator[str | Generation | PromptProgress], progress: bool) -> Iterator[Any]:
        """A stream's text pieces (and with `progress` its PromptProgress items); its Generation (counts,
        timings) is kept as `last_generation`."""
        self.last_generation = None
        for item in items:
            if isinstance(item, Generation):
                self.last_generation = item
            elif progress or not isinstance(item, PromptProgress):
                yield item

    def chat(self, messages: list[dict[str, Any]], stream: bool = False, **kwargs: Any) -> Generation | Iterator[str]:
        """Multi-turn chat in transformers' message format; images as {"type": "image", "image": path}, the
        stored SYSTEM / MESSAGEs put in by chat.with_stored. generate's keyword arguments; `stream` as there."""
        text, images, videos = self._chat_prompt(messages)
        return self.generate(text, images, template=False, videos=videos, stream=stream, **kwargs)

    def _chat_prompt(self, messages: list[dict[str, Any]]) -> tuple[str, list[Any], list[Any]]:
        """The rendered prompt of `messages` (with the stored SYSTEM / MESSAGEs) and its media."""
        messages = with_stored(self.defaults, messages)
        return (render(self.chat_template, messages), *chat_media(messages))

    def count_chat_tokens(self, messages: list[dict[str, Any]], min_pixels: int = MIN_PIXELS,
                          max_pixels: int = MAX_PIXELS, video_options: VideoOptions = VideoOptions()) -> int:
        """The prompt tokens `chat(messages)` reads (pictures' and videos' too), nothing run through the model."""
        text, images, videos = self._chat_prompt(messages)
        text, images, vids = self._prepare(text, images, videos, video_options, None, False)
        return len(self.tokenize(text, images, min_pixels, max_pixels, vids)[0])

    @torch.no_grad()
    def _run(self, text: str | list[int], images: list[ImageLike], max_new_tokens: int, params: SamplingParams,
             ctx_size: int | None, min_pixels: int, max_pixels: int,
             videos: list[VideoInput], cache_prompt: bool, stops: StopStrings,
             form: JsonConstraint | None, top: int | None) -> Iterator[str | Generation | PromptProgress]:
        """Generation from a rendered prompt; with `cache_prompt` on the part of the last
        generation's cache that the prompt starts with (prompt_cache.py); with `form` only the
        tokens it allows; with `top`, each token's log-probability and `top` alternatives. The prompt
        is read PROGRESS_TOKENS at a time, a PromptProgress before it (media encoded) and after each part."""
        t0 = time.perf_counter()
        ids, spans, pre = self.tokenize(text, images, min_pixels, max_pixels, videos)
        media = self._media(ids, spans, pre, videos)
        n_prompt = len(ids)
        capacity = ctx_size or min(self.cfg.context_length, n_prompt + max(max_new_tokens, 1))
        if n_prompt >= capacity:
            raise ModelError(f"prompt of {n_prompt} tokens does not fit a context of {capacity}")
        limit = min(capacity, n_prompt + max_new_tokens)
        keys = self._prompt_keys.keys(ids, media, self.adapters.salt)
        reuse = self._prompt_keys.reusable(keys, media) if cache_prompt else 0
        if cache_prompt and self.cache_pool is not None:  # other conversations' caches (cache_pool.py)
            reuse = self.cache_pool.before(self, self._prompt_keys, keys, media, reuse)
        self._generation += 1
        this = self._generation
        self._prompt_keys.kept = []  # until this generation says what its cache holds
        if self._graph is not None:
            self._graph.drain()  # a step the last generation queued ahead (it may not have finished)
        # media are encoded before the cache is made (a kept cache stays, unless a --max-vram plan puts vision there)
        encodes = self.vision is not None and any(m.start >= reuse for m in media)
        staged = self._let_cache_go(limit, reuse, encodes and self._vision_planned_alone())
        out_ids: list[int] = []
        self.live, ended = Live(n_prompt, out_ids, reuse, t0), False
        cache: KVCache | None = None
        drafts: Drafts | None = None
        timings: dict[str, float] = {}
        try:
            embeds, timings = self._embed(ids, media, reuse)
            cache = self._generation_cache(limit, reuse, staged)
            positions = rope_positions(spans)
            yield self.live.progress(reuse)
            for lo in range(0, len(embeds), PROGRESS_TOKENS):  # a prefill_oom retry reads this part again
                hi = min(lo + PROGRESS_TOKENS, len(embeds))
                hidden = self._prefill_hidden(embeds[lo:hi], positions[:, reuse + lo:reuse + hi], cache)
                if hi < len(embeds):
                    yield self.live.progress(reuse + hi)
            logits = self.decoder.logits(hidden[-1][-1:])[-1]
            timings["prefill_s"] = (t1 := time.perf_counter()) - t0 - timings.get("vision_ms", 0.0) / 1e3
            yield self.live.progress(n_prompt, t1)
            next_pos = int(positions.max()) + 1 if n_prompt else 0
            gen, answer = torch.Generator().manual_seed(params.seed), TextStream(self.tokenizer)
            text_ids = [t for t in ids if t not in (self.image_pad_id, self.video_pad_id)]
            seen = text_ids * params.chain.prompt_seen
            graph = self._graph if self._graph is not None and self._graph.cache is cache else None
            fresh = graph is not None and graph.graph is None  # captured on this generation's first step
            # greedy with no penalty: the step's own argmax, the next step queued before it is read
            ahead = graph is not None and params.greedy and not params.adjusted and form is None and top is None
            if self.speculation is not None:  # drafts from the text itself or a draft model (speculative.py)
                ahead, drafts = False, Drafts(self.speculation, self.decoder.first_on_accel == 0, text_ids, limit,
                                              cache, partial(self._decode, cache), self.drafter,
                                              DraftPrompt(ids, positions, media, keys, next_pos, embeds, reuse))
                self.live.drafts = drafts
            scored: list[TokenLogprob] | None = None if top is None else []
            self.scored = scored if scored is not None else []
            chosen: int | None = None
            for i in range(max_new_tokens):
                if chosen is not None:
                    tok = chosen
                elif form is not None:
                    try:
                        tok = sample_allowed(logits, seen + out_ids, params, gen, form)
                    except FormatError as e:  # a schema nothing can satisfy (a $ref to itself alone)
                        raise ModelError(str(e)) from None
                    form.accept(tok)
                else:
                    tok = sample(logits, seen + out_ids, params, gen)
                if tok in self.stop_ids:
                    ended = True
                    break
                if scored is not None:
                    scored.append(token_logprob(logits, tok, top or 0, drawn_from(gen, params)))
                out_ids.append(tok)
                self.live.chose()
                piece = answer.push(tok)
                if piece is not None:  # None: the token ends inside a multi-byte character
                    if shown := (stops.feed(answer.text) if stops.stops else piece):
                        yield shown
                    if stops.hit is not None:
                        ended = True
                        break
                if cache.length >= limit:
                    break
                if self._generation != this:
                    raise ModelError("another generation started on this model; this one cannot go on")
                if ahead and graph is not None:
                    chosen = graph.decode_greedy(tok, next_pos, i + 1 < max_new_tokens and cache.length + 1 < limit)
                elif drafts is not None:  # room: draft tokens whose logits could still be used
                    logits = drafts.next(tok, next_pos, min(limit - cache.length - 1, max_new_tokens - i - 2))
                else:
                    logits = self._decode(cache, [tok], next_pos)[-1]
                next_pos += 1
            timings["decode_s"] = time.perf_counter() - t1
            timings["sampled_s"] = self.live.answer_s()
            timings.update(drafts.timings() if drafts is not None else {})
            if fresh and graph is not None and graph.capture_s is not None:
                timings["capture_s"] = graph.capture_s  # inside decode_s
        finally:
            if self._graph is not None:
                self._graph.drain()  # a greedy step queued past the answer's end
            if self._generation == this and cache is not None:  # it holds the prompt and the answer fed so far
                self._prompt_keys.kept = (keys + out_ids)[:cache.length]
            if "prefill_s" in timings:  # the prompt was read: counted, as llama.cpp's /metrics, answer left or not
                self.usage.add(n_prompt, reuse, timings["prefill_s"], len(out_ids), self.live.answer_s(),
                               drafts.counts if drafts is not None else DraftCounts())
        final = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        if stops.hit is not None:
            final = answer.text[:stops.hit]
        shown = stops.sent if stops.stops else len(answer.text)
        if final[shown:]:  # text held back for a stop string, or a character the answer ended inside of
            yield final[shown:]
        yield Generation(final, out_ids, n_prompt, timings, list(videos), reused_tokens=reuse, ended=ended,
                         logprobs=scored, image_sizes=[p.size for p in pre])


ALL_LAYERS = 1 << 20  # --gpu-layers default on a GPU: every layer and the output layer

