"""Compile every Triton kernel for GPUs that are not here and print what each launch needs.

    python scripts/compile_kernels.py            # sm_75, 80, 86, 89, 90, 120
    python scripts/compile_kernels.py --arch 90 --json
    python scripts/compile_kernels.py --arch 89 --types Q4_K,Q6_K   # the type-dependent launches of two types

Per launch (the runtime's calls at 3B / 7B shapes, kernels/cross_compile.py): registers per
thread, stack bytes (spills), shared memory against the GPU's limit, tensor-core instructions
in the PTX (tc), and the SASS instructions, barriers and int-to-float conversions of the
kernel's main loop (loop, bar, i2f: work per iteration, a proxy for speed where nothing can be
timed; a conversion issues at a quarter of the FMA rate or less). Exit status 1 when a launch
does not fit its GPU (too much shared memory, registers, or spills) or packs inline assembly
over elements that are not a run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are imported: compile, not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from qvl.kernels.cross_compile import ARCHS, cross_compile  # noqa: E402
from qvl.kernels.qblocks import SUPPORTED  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS),
                        help="compute capability x 10 (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="one JSON object per launch instead of a table")
    parser.add_argument("--loops-of", metavar="KERNEL", action="append",
                        help="read the main loop (a SASS disassembly, ~0.5 s a launch: most of the time taken) "
                             "only for this kernel's launches (repeatable; default: every kernel's); 0 for the rest")
    parser.add_argument("--types", metavar="Q4_K,Q6_K,...",
                        help="compile the type-dependent launches (GEMV, GEMM, dequantize) for these quantization types "
                             "only (default: every supported type)")
    parser.add_argument("--split-types", metavar="Q4_K,Q6_K,...",
                        help="of those, the types whose GEMVs are also compiled with K split as asked (one split, 2, "
                             "or 4 at M=5; default: all of them)")
    args = parser.parse_args()

    def type_list(option: str, text: str | None) -> tuple | None:
        if text is None:
            return None
        names = [n.strip().upper() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in {t.name for t in SUPPORTED}]
        if unknown or not names:
            parser.error(f"{option}: {', '.join(unknown) or 'empty'}: not one of {', '.join(t.name for t in SUPPORTED)}")
        return tuple(t for t in SUPPORTED if t.name in names)

    types, split_types = type_list("--types", args.types), type_list("--split-types", args.split_types)
    bad = 0
    for arch in args.arch or sorted(ARCHS):
        start = time.perf_counter()
        results = cross_compile(arch, None if args.json else lambda name: print(f"  compiling {name}", file=sys.stderr),
                                loops_of=tuple(args.loops_of) if args.loops_of else None, types=types,
                                split_types=split_types)
        if not args.json:
            gpus, shared, cores = ARCHS[arch]
            print(f"\nsm_{arch} ({gpus}; {shared // 1024} KiB shared a block, {cores} SMs): "
                  f"{len(results)} launches in {time.perf_counter() - start:.0f} s")
            print(f"{'case':<52} {'kernel':<24} {'warps':>5} {'regs':>5} {'stack':>5} {'shared':>7} {'tc':>4} "
                  f"{'loop':>5} {'bar':>3} {'i2f':>3}  problems")
        for r in results:
            problems = r.problems()
            bad += bool(problems)
            if args.json:
                print(json.dumps(dataclasses.asdict(r) | {"problems": problems}))
            else:
                print(f"{r.case:<52} {r.kernel:<24} {r.num_warps:>5} {r.registers:>5} {r.stack:>5} {r.shared:>7} "
                      f"{r.tensor_core_ops:>4} {r.loop_instructions:>5} {r.loop_barriers:>3} {r.loop_conversions:>3}  "
                      + "; ".join(problems))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
