"""Imported first by kernel tests: without a GPU, Triton kernels run in its interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ACCEL = "cuda" if torch.cuda.is_available() else "cpu"  # where kernel tests put their tensors (the accelerator's part)
