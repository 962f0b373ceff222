"""runtime/kernel_failure.py: a Triton kernel that fails halfway through an answer reaches a
Python caller as a one-line KernelFailure with Triton's error as its cause; any other error,
and running out of memory, reach it as they were."""

from __future__ import annotations

import os

import pytest
import torch
import triton
from triton.runtime.errors import OutOfResources

from qvl.runtime.kernel_failure import KernelFailure, is_tritons
from qvl.runtime.model import Model
from qvl.runtime.loader import load

PAGES = "PassManager::run failed\n" + "\n".join(f"  %{i} = tt.load ... loc(#loc{i})" for i in range(300))


def _raise(kind: str) -> None:
    if kind == "triton's type":
        raise OutOfResources(122880, 101376, "shared memory")
    if kind == "out of memory":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    where = os.path.join(os.path.dirname(triton.__file__), "compiler", "compiler.py")  # a compiler pass
    exec(compile(f"raise RuntimeError({PAGES!r})", where if kind == "in triton's code" else "elsewhere.py", "exec"))


@pytest.fixture(scope="module")
def model(fixtures_dir) -> Model:
    return load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf", device="cpu")


@pytest.mark.parametrize("kind", ["triton's type", "in triton's code", "elsewhere", "out of memory"])
@pytest.mark.parametrize("call", ["generate", "stream", "prompt_logits", "token_hidden"])
def test_tritons_errors_are_one_line_the_rest_as_they_were(model, monkeypatch, kind, call):
    before = model.generate("Hi", max_new_tokens=3).token_ids
    inner = {"prompt_logits": "_prefill", "token_hidden": "_prefill_hidden"}.get(call, "_run")
    monkeypatch.setattr(Model, inner, lambda *args, **kwargs: _raise(kind))
    with pytest.raises(Exception) as raised:
        if call == "prompt_logits":
            model.prompt_logits("Hi")
        elif call == "token_hidden":
            model.token_hidden([9707])
        else:
            list(model.generate("Hi", max_new_tokens=3, stream=call == "stream"))
    error = raised.value
    if kind in ("elsewhere", "out of memory"):
        assert not isinstance(error, KernelFailure)
        assert isinstance(error, torch.OutOfMemoryError if kind == "out of memory" else RuntimeError)
    else:
        assert isinstance(error, KernelFailure) and is_tritons(error.__cause__)
        assert "\n" not in str(error)
        line = "OutOfResources: out of resource: shared memory" if kind == "triton's type" \
            else "RuntimeError: PassManager::run failed"
        assert str(error).startswith(f"a Triton kernel failed on this GPU ({line}")
        assert str(error).endswith("a Placement with kernels=False runs torch's matmuls on the GPU instead")
    monkeypatch.undo()
    assert model.generate("Hi", max_new_tokens=3).token_ids == before  # the model still answers


def test_a_long_first_line_is_cut():
    error = KernelFailure(RuntimeError("x" * 1000 + "\nmore"))
    assert error.line == "RuntimeError: " + "x" * (240 - len("RuntimeError: "))
