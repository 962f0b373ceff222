"""Count the GPU kernel launches of one captured decode step, without a GPU.

    python scripts/count_launches.py model.gguf [--arch 90] [--cache-type bf16] [--json]

Loads the model wholly "on the accelerator", with torch's meta device standing in for the GPU
(tensors with shapes and no data: an operation that mixes a CPU tensor into the accelerator's
work fails here as it would on a GPU) and the kernels compiled for sm_ARCH and never run
(kernels/cross_compile.py). It runs the vision tower on a 280x420 image when the model has one
(its window attention), prefills 20 tokens (the tiled GEMM and prefill attention), runs
DecodeGraph's step once to compile, then once more counting what a CUDA graph of it would hold:
Triton launches by kernel, and the torch operations that launch a CUDA kernel (views and
allocations do not, nor work on the host); and what sends a step's inputs before the graph
replays (`DecodeGraph.stage`)."""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported: compile, not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from qvl.kernels.cross_compile import ARCHS, compile_only  # noqa: E402
from qvl.kernels.target import Target, pretending  # noqa: E402

# aten operations that launch no kernel: views, metadata and allocations
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "select", "slice", "unsqueeze", "squeeze", "expand",
             "as_strided", "detach", "alias", "empty", "empty_like", "empty_strided", "reshape", "permute",
             "unflatten", "flatten", "split", "split_with_sizes", "unbind", "lift_fresh"}


class _TorchKernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in (*args, *(kwargs or {}).values(), out) if isinstance(t, torch.Tensor)]
        if name not in NO_KERNEL and any(t.device.type != "cpu" for t in tensors):  # host work launches nothing
            self.ops[name] += 1
        return out


def count(path: str, arch: int, cache_type: str) -> dict:
    from PIL import Image

    from qvl.runtime.decode_graph import DecodeGraph
    from qvl.runtime.image import preprocess
    from qvl.runtime.model import ALL_LAYERS
    from qvl.runtime.loader import load
    from qvl.runtime.placement import Placement

    with compile_only(arch) as launched, pretending(Target(arch, ARCHS[arch][2])):
        model = load(path, device="cpu", dtype=torch.bfloat16,
                     placement=Placement("meta", ALL_LAYERS, vision_on_accel=True, kv_type=cache_type))
        if model.vision is not None:
            image = preprocess(Image.new("RGB", (420, 280)))
            feats = model.vision.forward(torch.from_numpy(image.pixels), [image.grid_thw])
            assert feats.device.type == "meta"
        dec = model.decoder
        cache = dec.new_cache(64, cache_type)
        prompt = torch.arange(20)
        dec.forward(dec.embed_tokens(prompt), prompt.expand(3, -1).contiguous(), cache)
        graph = DecodeGraph(dec, cache, graphs=False)
        graph.stage(5, 20)
        graph._step()  # compiles
        launched.clear()
        inputs, torch_kernels = _TorchKernels(), _TorchKernels()
        with inputs:
            graph.stage(5, 20)
        with torch_kernels:
            graph._step()
    triton_kernels = collections.Counter(name for name, _ in launched)
    return {"arch": arch, "layers": len(dec.layers), "vision": model.vision is not None, "triton": dict(triton_kernels),
            "torch": dict(torch_kernels.ops), "inputs": dict(inputs.ops), "total": sum(triton_kernels.values()) + sum(torch_kernels.ops.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a GGUF text model")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS), help="compute capability x 10")
    parser.add_argument("--cache-type", default="bf16", choices=["f32", "bf16", "f16", "q8_0"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not os.path.isfile(args.model):
        print(f"count_launches.py: no such file: {args.model}", file=sys.stderr)
        return 1
    found = count(args.model, args.arch, args.cache_type)
    if args.json:
        print(json.dumps(found))
    else:
        print(f"sm_{found['arch']}, {found['layers']} layers, {args.cache_type} cache: {found['total']} launches a "
              f"decode step")
        for kind in ("triton", "torch"):
            for name, n in sorted(found[kind].items(), key=lambda kv: -kv[1]):
                print(f"  {kind:<6} {name:<28} {n}")
        print(f"  before it, the step's inputs: {found['inputs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
