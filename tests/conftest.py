"""Shared test fixtures: paths into ../shared and tiny checkpoints generated with transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `python -m pytest` puts the repository root on sys.path, where kernels/ (qvl.kernels) would
# shadow the PyPI package `kernels` that transformers 5.25 and later import.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# Without a GPU, Triton's kernels run in its interpreter: TRITON_INTERPRET must be set before any
# @triton.jit kernel is defined, so before qvl is imported from any test module, whichever
# directory pytest collects first (kernels/interpret.py sets it, and speeds the interpreter up).
sys.path.insert(0, str(Path(__file__).resolve().parent / "kernels"))
import interpret  # noqa: E402,F401
from paths import FIXTURES  # noqa: E402
from qvl.runtime import cpu_gemm  # noqa: E402


CROSS_COMPILE = "test_cross_compile.py"


def pytest_collection_modifyitems(config, items):
    """The cross-compile tests last: their compiles run in the background meanwhile."""
    items.sort(key=lambda item: item.path.name == CROSS_COMPILE)  # stable: the rest keep their order


def pytest_collection_finish(session):
    """Start the cross-compile check's compiles if a collected test waits for them."""
    if session.config.option.collectonly:
        return
    if any(item.path.name == CROSS_COMPILE and "compiled" in getattr(item, "fixturenames", ())
           for item in session.items):
        import cross_compile_jobs

        cross_compile_jobs.start()


def pytest_unconfigure(config):
    if "cross_compile_jobs" in sys.modules:
        sys.modules["cross_compile_jobs"].stop()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (set QVL_SHARED)")
    return FIXTURES


@pytest.fixture(params=["bf16", "f32"])
def cpu_gemms(request, monkeypatch) -> str:
    """Each of the CPU's two GEMM types (runtime/cpu_gemm.py), whichever this host has: bf16
    (native bf16 instructions) or float32 (AVX2: tiles decoded to float32)."""
    monkeypatch.setenv(cpu_gemm.ENV, "1" if request.param == "bf16" else "0")
    cpu_gemm.bf16_gemms.cache_clear()
    yield request.param
    cpu_gemm.bf16_gemms.cache_clear()
