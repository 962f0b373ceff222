"""qvl: a local runtime for the Qwen2-VL and Qwen2.5-VL vision-language models.

The repository root is the `qvl` package: `convert/` (Hugging Face -> GGUF and the
quantizers), `kernels/` (Triton kernels with their torch references), `runtime/`
(loading, model, generation, CLI, model store).
"""

__version__ = "0.1.0"


def load(path, device="auto", dtype=None, mmproj=None, placement=None, max_vram=None, plan_ctx=4096):
    """Load a GGUF model; see qvl.runtime.loader.load (imported lazily: the converter needs no torch)."""
    from .runtime.loader import load as _load

    return _load(path, device=device, dtype=dtype, mmproj=mmproj, placement=placement, max_vram=max_vram,
                 plan_ctx=plan_ctx)
