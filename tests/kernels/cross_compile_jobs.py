"""The cross-compile check's compiles (test_cross_compile.py), started in the background as soon
as pytest has collected a test that needs them, so they run on the CPU the interpreted tests
leave idle (those run on one core) instead of after them.

One `scripts/compile_kernels.py --json` process per GPU architecture, at a lower priority than
pytest's own process, writing to files (a pipe nobody reads would fill and stall it). On a
2-core machine with Triton's cache empty they take some 20 CPU-minutes; started after
collection, most of that is done by the time test_cross_compile.py runs (the suite orders it
last: tests/conftest.py).

Each type-dependent launch the runtime's defaults make (the batch-1 GEMVs with bias and
residual, SwiGLU, or the next RMSNorm; the GEMMs; the dequantization) is compiled for every
quantization type on the architectures of the two launch tables (FULL_TYPES_ON: sm_86, the
smallest shared memory of the tensor-core GPUs and the general launches, which sm_80, 89 and
120 get too; sm_90, the launches measured on an H200, some per type). The GEMVs with K split
as asked (one split, 2, or 4 at M=5: their split epilogue is the same code whatever the type)
are compiled for SAMPLED_TYPES there. The other architectures (sm_75's FMA products, sm_80 and
sm_89 beside sm_86, sm_120's ptxas) compile every kernel with SAMPLED_TYPES' launches: the types
of the Q4_K_M and Q8_0 files and Q5_0, whose inline assembly reads packs of codes as runs.
`scripts/compile_kernels.py` with neither --types nor --split-types compiles every type's every
launch everywhere (about 7 minutes an architecture on such a machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO

from gguf import GGMLQuantizationType as T
from paths import REPO

from qvl.kernels.cross_compile import ARCHS
from qvl.kernels.qblocks import SUPPORTED

FULL_TYPES_ON = (86, 90)
SAMPLED_TYPES = (T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0)
WAIT_S = 1800  # for the last of them, from when a test first asks


def types_for(arch: int) -> tuple[T, ...]:
    """The quantization types whose launches are compiled for sm_`arch` (the GEMVs with K split
    as asked: SAMPLED_TYPES' only)."""
    return tuple(SUPPORTED) if arch in FULL_TYPES_ON else SAMPLED_TYPES


@dataclass
class _Job:
    proc: subprocess.Popen
    out: IO[str]
    err: IO[str]


_jobs: dict[int, _Job] = {}
_results: dict[int, tuple[int, list[dict], str]] = {}


def _lower_priority() -> None:
    os.nice(10)


def start() -> None:
    """Start one compile process per architecture (once)."""
    if _jobs or _results:
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    for arch in sorted(ARCHS):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        types = ["--split-types", ",".join(t.name for t in SAMPLED_TYPES)]
        if arch not in FULL_TYPES_ON:
            types += ["--types", ",".join(t.name for t in types_for(arch))]
        # the main loops (a SASS disassembly each) of the decode GEMVs' launches only: the loops the tests check
        cmd = [sys.executable, str(REPO / "scripts" / "compile_kernels.py"), "--json", "--arch", str(arch),
               "--loops-of", "qgemv_kernel", "--loops-of", "qgemv_q8_kernel", *types]
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env,
                                preexec_fn=_lower_priority if hasattr(os, "nice") else None)
        _jobs[arch] = _Job(proc, out, err)


def results() -> dict[int, tuple[int, list[dict], str]]:
    """arch -> (exit status, one record per launch, stderr), waiting for the processes."""
    start()
    for arch, job in list(_jobs.items()):
        job.proc.wait(timeout=WAIT_S)
        job.out.seek(0)
        job.err.seek(0)
        _results[arch] = job.proc.returncode, [json.loads(line) for line in job.out if line.strip()], job.err.read()
        job.out.close()
        job.err.close()
        del _jobs[arch]
    return _results


def stop() -> None:
    """Kill what is still running (a session that ends before the cross-compile tests)."""
    for job in _jobs.values():
        job.proc.kill()
        job.proc.wait()
        job.out.close()
        job.err.close()
    _jobs.clear()
