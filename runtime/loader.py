"""`qvl.load(...)`: a GGUF file, pair or store name opened as a Model on the CPU or a GPU."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import fit
from .gguf_file import GGUFFile
from .lora import LoraError, LoraSource
from .memory import give_back_free_memory
from .model import ALL_LAYERS, PLAN_CTX, Model, ModelError
from .placement import Placement, PlacementError


def open_ended(max_new_tokens: int, ctx_size: int | None) -> tuple[int, int | None]:
    """(max_new_tokens, ctx_size) with llama.cpp's -n -1 / Ollama's num_predict -1 read as "until
    the answer ends or the context is full": the context (PLAN_CTX where none is given) bounds it."""
    if max_new_tokens != -1:
        return max_new_tokens, ctx_size
    ctx_size = ctx_size or PLAN_CTX
    return ctx_size, ctx_size


def find_mmproj(model: Path) -> Path | None:
    """llama.cpp's pairing: mmproj-<stem>.gguf beside the model, else the folder's single mmproj*.gguf."""
    named = model.with_name(f"mmproj-{model.name}")
    if named.exists():
        return named
    candidates = sorted(p for p in model.parent.glob("mmproj*.gguf") if p != model)
    return candidates[0] if len(candidates) == 1 else None


def load(path: str | Path, device: str = "auto", dtype: torch.dtype | None = None,
         mmproj: str | Path | None = None, placement: Placement | None = None,
         max_vram: float | None = None, plan_ctx: int = PLAN_CTX, lora: Sequence[LoraSource] = ()) -> Model:
    """Load a GGUF model (llama.cpp pair, Ollama single file, or qvl-convert's output).

    device "auto" takes CUDA when torch sees a GPU. On CUDA the default placement is the whole
    model on the GPU through the Triton kernels, or as much of it as the GPU's free memory holds
    (Placement.fit_free: `Model.fit_note` says what it changed); `placement` says otherwise (layers, vision
    tower, kernels, KV cache type) and `max_vram` (GB) fits it into a budget for a
    `plan_ctx`-token context. Where the Triton kernels cannot run on the GPU (kernels/probe.py),
    a warning says why and torch's matmuls run there instead. `lora`: LoRA adapters applied at
    run time, (an adapter GGUF or PEFT folder, its scale) each (lora.py); an adapter that does not
    fit the model is a ModelError."""
    if device not in ("auto", "cpu", "cuda"):
        raise ModelError(f"device {device!r}: choose auto, cpu or cuda")
    if dtype not in (None, torch.bfloat16, torch.float32):
        raise ModelError(f"dtype {dtype}: choose torch.bfloat16 (the default) or torch.float32")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ModelError("device 'cuda': torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    use_cuda = device == "cuda" or (device == "auto" and has_cuda)
    if placement is None:
        placement = Placement("cuda", ALL_LAYERS, vision_on_accel=True, fit_free=True) if use_cuda else Placement()
    if placement.accel == "cuda" and not use_cuda:
        raise ModelError(f"device {device!r} with a CUDA placement: choose device='cuda'")
    if max_vram is not None and placement.accel is None:
        raise ModelError("max_vram plans GPU memory: it needs a GPU placement")
    if placement.accel == "cuda" and placement.kernels:
        from ..kernels import probe

        why = probe.why_not(torch.device("cuda"))
        if why is not None:  # as qvl-run: the torch path on the GPU, not a traceback at the first prompt
            warnings.warn(f"{why}; using torch matmuls on the GPU (as kernels=False)", stacklevel=2)
            placement = replace(placement, kernels=False)
    fast = dtype != torch.float32
    try:
        model = fit.retrying_load(lambda budget: _open(Path(path), fast, mmproj, placement, budget, plan_ctx, lora),
                                  None if max_vram is None else int(max_vram * 2**30),
                                  placement.accel if placement.fit_free else None)
    except (PlacementError, LoraError) as e:
        raise ModelError(str(e)) from None
    give_back_free_memory()
    return model


def _open(path: Path, fast: bool, mmproj: str | Path | None, placement: Placement, max_vram: int | None,
          plan_ctx: int, lora: Sequence[LoraSource] = ()) -> Model:
    defaults: dict[str, Any] = {}
    template: Any = None  # a stored model's TEMPLATE (ollama_template.OllamaTemplate), if it has one
    adapters = list(lora)  # a stored model's ADAPTER layers first

    def model(text: GGUFFile, vision: GGUFFile | None) -> Model:
        m = Model(text, vision, fast, placement, max_vram, plan_ctx, adapters)
        m.defaults = defaults
        if template is not None:
            m.chat_template = template
        return m

    if not path.exists() and mmproj is None:  # a store name (pulled when missing), else the missing file's error
        from .sources import stored_or_pulled

        name = str(path)
        path, mmproj = stored_or_pulled(name) or (path, None)
        if path.exists():
            defaults = stored_generate_defaults(name)
            template = stored_template_of(name)
            adapters = [(a, 1.0) for a in _stored(lambda store: store.adapters(store.get(name)))] + adapters
    text = GGUFFile(path)
    if text.architecture == "qwen25vl":
        return model(text, text)  # Ollama: vision in the same file
    if text.architecture == "qwen2" and not mmproj:  # a text-only model: a folder's mmproj is another model's
        return model(text, None)
    vision_path = Path(mmproj) if mmproj else find_mmproj(path)
    return model(text, GGUFFile(vision_path) if vision_path else None)


def stored_template_of(name: str) -> Any:
    """A stored model's TEMPLATE (ollama_template.OllamaTemplate), or None."""
    from .modelfile import stored_chat_template

    return _stored(lambda store: stored_chat_template(store, name))


def _stored(read: Callable[[Any], Any]) -> Any:
    """`read(Store())`, a StoreError as a ModelError."""
    from .store import Store, StoreError

    try:
        return read(Store())
    except StoreError as e:
        raise ModelError(str(e)) from None


def stored_generate_defaults(name: str) -> dict[str, Any]:
    """A stored model's PARAMETERs and SYSTEM as Model.generate's keyword arguments, and its
    MESSAGE lines as "messages" (its defaults: Model.defaults); num_predict -1 as qvl-run's -n -1,
    the context bounding the answer."""
    from .modelfile import generate_kwargs, stored_defaults
    from .store import Store, StoreError

    store = Store()
    try:
        params, system = stored_defaults(store, name)
        messages = store.messages(store.get(name))
    except StoreError as e:
        raise ModelError(str(e)) from None
    out: dict[str, Any] = generate_kwargs(params)
    if out.get("max_new_tokens") == -1:
        out["max_new_tokens"], out["ctx_size"] = open_ended(-1, out.get("ctx_size"))
    if system is not None:
        out["system"] = system
    if messages:
        out["messages"] = messages
    return out
