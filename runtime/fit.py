"""Fitting a model to the GPU's free memory (Placement.fit_free: qvl-run's default on a GPU,
as Ollama and llama.cpp's --fit do): how much is free, the one line that says what moved, and
a second, smaller plan where loading on the first ran out of GPU memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from .placement import PlacementError, Plan

if TYPE_CHECKING:
    from .model import Model

M = TypeVar("M", bound="Model")
LOAD_RETRY_SHARE = 0.85  # of the free memory, the budget of a second try at a load that ran out of it


def free_bytes(accel: str) -> int | None:
    """Bytes free on a CUDA device, after what other processes and this one's context hold
    (torch.cuda.mem_get_info); None for another device (the tests' stand-in accelerator)."""
    device = torch.device(accel)
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def note(asked: Plan, free: int, plan: Plan | None) -> str:
    """One line: what was asked for the GPU, what is free there, and where the model runs now."""
    gib = 2**30
    head = f"the model needs ~{asked.total / gib:.1f} GiB on the GPU ({asked.ctx}-token context), {free / gib:.1f} " \
           "GiB is free there"
    if plan is None:
        return f"{head}: running on the CPU (--max-vram or --gpu-layers to choose)"
    return f"{head}: {placed(plan)} (--max-vram or --gpu-layers to choose)"


def placed(plan: Plan) -> str:
    """Where a plan puts the decoder layers and the vision tower, in words."""
    where = "GPU" if plan.vision_on_gpu else "CPU"
    streamed = ", streamed" if plan.vision_streamed else ""
    output = " and the output layer" if plan.gpu_layers > plan.n_layer else ""
    return (f"{min(plan.gpu_layers, plan.n_layer)}/{plan.n_layer} decoder layers{output} on the GPU, the rest on "
            f"the CPU, the vision tower on the {where}{streamed}")


def retrying_load(open_model: Callable[[int | None], M], budget: int | None, fit_to: str | None) -> M:
    """open_model(budget) (bytes; None: no budget, or fitted to the free memory). Where that
    runs out of GPU memory without a budget on a placement fitted to the free memory of `fit_to`
    (Placement.fit_free: neither --max-vram nor --gpu-layers), open_model once more with a budget
    of LOAD_RETRY_SHARE of what is free then (the plan's estimates fell short on this GPU), its
    fit_note saying so."""
    if fit_to is None or budget is not None:
        return open_model(budget)
    try:
        return open_model(None)
    except torch.OutOfMemoryError:
        pass  # handled outside: the failed try's frames, and the weights they hold, are gone first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    free = free_bytes(fit_to)
    if free is None:
        raise torch.OutOfMemoryError("out of GPU memory loading the model")
    budget = int(LOAD_RETRY_SHARE * free)
    try:
        model = open_model(budget)
    except PlacementError:
        raise torch.OutOfMemoryError("out of GPU memory loading the model") from None
    if model.plan is not None:
        model.fit_note = (f"out of GPU memory loading the model on its plan; planned again for "
                          f"{LOAD_RETRY_SHARE:.0%} of the {free / 2**30:.1f} GiB free: {placed(model.plan)} "
                          "(--max-vram or --gpu-layers to choose)")
    return model
