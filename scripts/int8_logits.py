#!/usr/bin/env python3
"""What int8 activations (kernels/qgemv_q8.py, QVL_INT8_GEMV=1) do to a model's decode logits.

A prompt of random token ids is prefilled once; then `--steps` decode steps are run twice from
copies of that cache, with the same token fed to both at each step (the float path's greedy
choice), through the decode step (runtime/decode_graph.DecodeGraph: every batch-1 product of
a Q4_K or Q6_K weight by a GEMV): once with the float GEMVs (qgemv.py), once with the int8
ones. Printed, one JSON object: the largest |logit difference| relative to the float path's
largest |logit| over all steps, its median over the steps, the mean KL divergence of the
int8 path's next-token distribution from the float one's, and the share of steps whose
argmax agrees. On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1; small
models only).

With `--reference` (the same checkpoint converted to F32 or F16), a third decode runs on those
weights, its greedy choice is the token fed to all three, and the float and int8 paths are both
measured against it: what the quantized weights already move (`weights`) beside what int8
activations add (`weights_and_int8`), on the same scale.

    TRITON_INTERPRET=1 python scripts/int8_logits.py tiny-q4_k_m.gguf --device cpu --steps 16
    python scripts/int8_logits.py /tmp/q7b-q4_k_m.gguf --device cuda --steps 64
    TRITON_INTERPRET=1 python scripts/int8_logits.py tiny-q4_k_m.gguf --reference tiny-f32.gguf --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch


def _stats(pairs: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> dict:
    """(got, ref) logits a step -> the largest |difference| / scale over the steps, its median a step,
    the mean KL divergence of got's distribution from ref's, the share of steps whose argmax agrees."""
    errors = [(got - ref).abs().max().item() for got, ref in pairs]
    kls = [torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="sum").item() for got, ref in pairs]
    return {"max_abs_dlogit_rel": max(errors) / scale, "median_step_max_dlogit_rel": statistics.median(errors) / scale,
            "mean_kl": sum(kls) / len(pairs),
            "top1_agreement": sum(int(got.argmax()) == int(ref.argmax()) for got, ref in pairs) / len(pairs)}


def compare(path: str, device: str, steps: int, prompt: int, seed: int, reference: str | None = None) -> dict:
    import qvl.kernels.q8_activations as q8
    from qvl.runtime.decode_graph import DecodeGraph
    from qvl.runtime.model import ALL_LAYERS
    from qvl.runtime.loader import load
    from qvl.runtime.placement import Placement

    def prefilled(gguf: str, ids: torch.Tensor | None = None) -> tuple[object, object, torch.Tensor]:
        """(decoder, cache holding the prompt, its ids: random ones where not given)."""
        dec = load(gguf, device=device, dtype=torch.float32,
                   placement=Placement(torch.device(device), ALL_LAYERS, kv_type="f32")).decoder
        if ids is None:
            ids = torch.randint(0, dec.embed.rows, (prompt,), generator=torch.Generator().manual_seed(seed))
        cache = dec.new_cache(prompt + steps + 1, "f32")
        dec.forward(dec.embed_tokens(ids), torch.arange(prompt).expand(3, -1).contiguous(), cache)
        return dec, cache, ids

    dec, cache, ids = prefilled(path)
    graphs = {}
    for int8 in (False, True):  # a graph each: a captured step keeps the kernels it was captured with
        q8.ENABLED = int8
        graphs[int8] = DecodeGraph(dec, copy.deepcopy(cache))
    q8.ENABLED = False
    if reference is not None:
        graphs[None] = DecodeGraph(*prefilled(reference, ids)[:2])  # None: the unquantized weights
    token = int(ids[-1])
    steps_logits = []
    for step in range(steps):
        logits = {}
        for int8, graph in graphs.items():
            q8.ENABLED = bool(int8)
            logits[int8] = graph.step(token, prompt + step)[-1].float().cpu()
        steps_logits.append(logits)
        token = int(logits[None if reference is not None else False].argmax())
    q8.ENABLED = False
    out = {"model": path, "device": device, "steps": steps, "prompt_tokens": prompt}
    scale = max(step[False].abs().max().item() for step in steps_logits)
    out.update(_stats([(step[True], step[False]) for step in steps_logits], scale))
    if reference is not None:  # against the unquantized weights, on their logits' scale
        exact = max(step[None].abs().max().item() for step in steps_logits)
        out["reference"] = reference
        out["weights"] = _stats([(step[False], step[None]) for step in steps_logits], exact)
        out["weights_and_int8"] = _stats([(step[True], step[None]) for step in steps_logits], exact)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a GGUF text model with Q4_K / Q6_K matrices (a Q4_K_M file)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1")
    parser.add_argument("--steps", type=int, default=64, help="decode steps compared")
    parser.add_argument("--prompt", type=int, default=32, help="random prompt tokens prefilled first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", help="the same checkpoint at F32 / F16: measure both paths against it")
    args = parser.parse_args()
    print(json.dumps(compare(args.model, args.device, args.steps, args.prompt, args.seed, args.reference)))


if __name__ == "__main__":
    main()
