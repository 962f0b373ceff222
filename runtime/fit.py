"""Fitting a model to the GPU's free memory (Placement.fit_free: qvl-run's default on a GPU,
as Ollama and llama.cpp's --fit do): how much is free, and the one line that says what moved."""

from __future__ import annotations

import torch

from .placement import Plan


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
    where = "GPU" if plan.vision_on_gpu else "CPU"
    streamed = ", streamed" if plan.vision_streamed else ""
    output = " and the output layer" if plan.gpu_layers > plan.n_layer else ""
    return (f"{head}: {min(plan.gpu_layers, plan.n_layer)}/{plan.n_layer} decoder layers{output} on the GPU, the "
            f"rest on the CPU, the vision tower on the {where}{streamed} (--max-vram or --gpu-layers to choose)")
