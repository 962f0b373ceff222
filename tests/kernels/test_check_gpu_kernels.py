"""scripts/check_gpu_kernels.py's cases run and judge right (in Triton's interpreter here, on the
GPU in a device session), so a session on a lent GPU does not find the script broken: a case
against its reference passes, a wrong result fails, and an exception is reported, not raised."""

from __future__ import annotations

import importlib.util

import interpret  # noqa: F401  (sets TRITON_INTERPRET before triton is used)
import pytest
from interpret import ACCEL
from paths import REPO


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_gpu_kernels", REPO / "scripts" / "check_gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEVICE = ACCEL
    module.WINDOWS[:] = [16, 8]  # interpreted: short windows
    module.GEMV_NK[:] = [96, 1024]  # and a small weight (a split K still: 4 steps)
    return module


def test_every_case_is_named_once(check):
    names = list(check.cases())
    assert len(names) == len(set(names)) == 2 * len(check.ATTENTION_LAUNCHES) + 2 + 9 + 3


@pytest.mark.parametrize("name", ["attention vision d80 bf16 default", "attention vision d80 f32 default",
                                  "qmatmul Q4_K gemv m=3", "embedding row Q4_K from page-locked memory",
                                  "qgemv_q8 Q4_K int8 x", "qgemv_q8 Q6_K int8 x"])
def test_case_matches_its_reference(check, name):
    result = check.run_one(name)
    assert result["ok"] and result["error"] is None and result["max_err"] <= check.cases()[name][1], result


def test_wrong_result_and_exception_are_failures(check, monkeypatch):
    import qvl.kernels.attention as attn

    real = attn.attention
    monkeypatch.setattr(attn, "attention", lambda *a, **k: real(*a, **k) * 1.1)
    wrong = check.run_one("attention vision d80 f32 default")
    assert not wrong["ok"] and 0.05 < wrong["max_err"] < 0.15

    def broken(*a, **k):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(attn, "attention", broken)
    failed = check.run_one("attention vision d80 f32 default")
    assert not failed["ok"] and "illegal memory access" in failed["error"]
