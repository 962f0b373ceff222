"""Triton kernels, each with its torch reference beside it (arrives with the kernels issue)."""
