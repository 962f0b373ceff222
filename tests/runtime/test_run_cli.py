"""`qvl-run`: answers on stdout, figures on stderr, bad input one line with exit code 2."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qvl.runtime.run_cli import DEFAULT_PROMPT, app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_path(fixtures_dir):
    return str(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(p)
    return str(p)


def test_json_output(model_path, image_path):
    r = runner.invoke(app, [model_path, "--image", image_path, "--max-length", "6", "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 6 and out["prompt_tokens"] > 20
    assert {"prefill_s", "decode_s", "vision_ms"} <= set(out["timings"])


def test_plain_output_is_only_the_answer(model_path):
    r = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "4", "--verbose"])
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    assert "decode_tok_s" in r.stderr and "peak RSS" in r.stderr


@pytest.mark.parametrize("kernels,ptx,how", [(True, True, "Triton kernels with inline PTX"),
                                              (True, False, "Triton kernels, plain Triton code"),
                                              (False, True, "torch matmuls (--no-triton)")])
def test_verbose_names_the_gpu_and_its_kernels(monkeypatch, kernels, ptx, how):
    import triton

    from qvl.kernels import target as target_module
    from qvl.kernels.target import Target
    from qvl.runtime import run_cli

    monkeypatch.setattr(target_module, "target", lambda device: Target(90, 132, ptx=ptx))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert run_cli._system_line("cuda", kernels, False) == (
        f"qvl-run: torch {torch.__version__}, Triton {triton.__version__}, NVIDIA H200 (sm_90, 132 SMs), {how}")


@pytest.mark.parametrize("flags,how", [(["-t", "1"], "GEMMs ("), (["--f32", "-t", "2"], "float32 matmuls (--f32)")])
def test_verbose_says_first_where_the_matmuls_run(model_path, flags, how):
    """As llama.cpp's system_info: torch's version, the CPU threads and the GEMMs' type."""
    r = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "2", "--verbose", "--cpu", *flags])
    assert r.exit_code == 0, r.stderr
    first = r.stderr.splitlines()[0]
    threads = flags[flags.index("-t") + 1]
    assert first.startswith(f"qvl-run: torch {torch.__version__}, CPU, {threads} thread")
    assert how in first


def test_prompt_from_stdin_or_a_file(model_path, tmp_path):
    """`echo question | qvl-run MODEL` (Ollama) and `-f FILE` (llama.cpp) ask what --prompt asks."""
    def ids(args, stdin=""):
        r = runner.invoke(app, [model_path, "-n", "4", "--json", *args], input=stdin)
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)["token_ids"], json.loads(r.stdout)["prompt_tokens"]

    asked = ids(["-p", "Why is the sky blue?"])
    assert ids([], stdin="Why is the sky blue?\n") == asked
    (tmp_path / "q.txt").write_text("Why is the sky blue?")
    assert ids(["-f", str(tmp_path / "q.txt")], stdin="ignored") == asked
    assert ids([], stdin="") == ids(["-p", DEFAULT_PROMPT])  # nothing piped: the default question


def test_greedy_is_deterministic_and_stream_matches(model_path):
    a = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "8"])
    b = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "8", "--stream"])
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout


def test_negative_temperature_is_greedy_and_max_length_zero_only_reads_the_prompt(model_path):
    greedy = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "6", "--json"])
    negative = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "6", "--json", "--temperature", "-1"])
    none = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "0", "--json"])
    assert greedy.exit_code == negative.exit_code == none.exit_code == 0, (negative.stderr, none.stderr)
    assert json.loads(negative.stdout)["token_ids"] == json.loads(greedy.stdout)["token_ids"]
    out = json.loads(none.stdout)
    assert out["token_ids"] == [] and out["text"] == "" and out["prompt_tokens"] == json.loads(greedy.stdout)[
        "prompt_tokens"]


def test_frequency_and_presence_penalty_flags(model_path):
    """llama.cpp's --frequency-penalty / --presence-penalty: the tokens of Model.generate given them."""
    from qvl.runtime.loader import load

    got = runner.invoke(app, [model_path, "-p", "Hi", "-n", "6", "--json", "--frequency-penalty", "1.5",
                              "--presence-penalty", "0.5"])
    assert got.exit_code == 0, got.stderr
    model = load(model_path)
    want = model.generate("Hi", max_new_tokens=6, frequency_penalty=1.5, presence_penalty=0.5)
    assert json.loads(got.stdout)["token_ids"] == want.token_ids != model.generate("Hi", max_new_tokens=6).token_ids


def test_logit_bias_flag(model_path):
    """llama.cpp's -l/--logit-bias: -inf bans a token (the greedy answer's first), +N and -N move it."""
    from qvl.runtime.loader import load

    model = load(model_path)
    plain = model.generate("Hi", max_new_tokens=4).token_ids
    got = runner.invoke(app, [model_path, "-p", "Hi", "-n", "4", "--json", "-l", f"{plain[0]}-inf",
                              "--logit-bias", "7+0.5"])
    assert got.exit_code == 0, got.stderr
    want = model.generate("Hi", max_new_tokens=4, logit_bias={plain[0]: float("-inf"), 7: 0.5}).token_ids
    assert json.loads(got.stdout)["token_ids"] == want and plain[0] not in want


def test_sampler_chain_flags(model_path):
    """llama.cpp's --sampling-seq / --samplers, --typical, --top-nsigma, --xtc-*, --dynatemp-*, --dry-*, --mirostat*:
    the answer generate gives with the same ChainOptions and seed (and unlike qvl's order's)."""
    from qvl.runtime.loader import load
    from qvl.runtime.sampler_chain import ORDER_LLAMACPP, ChainOptions

    model = load(model_path)
    flags = ["--temperature", "1.5", "--seed", "11", "--top-k", "50", "--typical", "0.9", "--top-nsigma", "3",
             "--xtc-probability", "0.5", "--xtc-threshold", "0.05", "--dynatemp-range", "0.5", "--dynatemp-exp", "2",
             "--dry-multiplier", "0.8", "--dry-base", "2", "--dry-allowed-length", "1", "--dry-penalty-last-n", "30",
             "--dry-sequence-breaker", ":", "--dry-sequence-breaker", "ab"]
    chain = ChainOptions(ORDER_LLAMACPP, 0.9, 3.0, 0.5, 0.05, 0.5, 2.0, 0.8, 2.0, 1, 30, (":", "ab"))
    want = model.generate("Hi", max_new_tokens=12, temperature=1.5, seed=11, top_k=50, chain=chain).token_ids
    for order in (["--sampling-seq", "edskypmxt"], ["--samplers", ";".join(ORDER_LLAMACPP)]):
        got = runner.invoke(app, [model_path, "-p", "Hi", "-n", "12", "--json", *order, *flags])
        assert got.exit_code == 0, got.stderr
        assert json.loads(got.stdout)["token_ids"] == want
    ours = ChainOptions(None, 0.9, 3.0, 0.5, 0.05, 0.5, 2.0, 0.8, 2.0, 1, 30, (":", "ab"))
    assert model.generate("Hi", max_new_tokens=12, temperature=1.5, seed=11, top_k=50, chain=ours).token_ids != want
    want = model.generate("Hi", max_new_tokens=12, temperature=0.7, seed=2,
                          chain=ChainOptions(mirostat=1, mirostat_tau=4.0, mirostat_eta=0.3)).token_ids
    got = runner.invoke(app, [model_path, "-p", "Hi", "-n", "12", "--json", "--temperature", "0.7", "--seed", "2",
                              "--mirostat", "1", "--mirostat-ent", "4", "--mirostat-lr", "0.3"])
    assert got.exit_code == 0 and json.loads(got.stdout)["token_ids"] == want
    want = model.generate("Hi", max_new_tokens=12, temperature=0.7, seed=2,
                          chain=ChainOptions(("temperature", "adaptive_p"), adaptive_target=0.4, adaptive_decay=0.8))
    got = runner.invoke(app, [model_path, "-p", "Hi", "-n", "12", "--json", "--temperature", "0.7", "--seed", "2",
                              "--samplers", "temperature;adaptive_p", "--adaptive-target", "0.4",
                              "--adaptive-decay", "0.8"])
    assert got.exit_code == 0 and json.loads(got.stdout)["token_ids"] == want.token_ids
    assert want.token_ids != model.generate("Hi", max_new_tokens=12, temperature=0.7, seed=2).token_ids


def test_ignore_eos_runs_to_the_length(model_path):
    """--ignore-eos (llama.cpp's): an answer that a +100 bias on <|im_end|> ends at once runs to -n instead."""
    ended = runner.invoke(app, [model_path, "-p", "Hi", "-n", "4", "--json", "-l", "151645+100"])
    assert ended.exit_code == 0 and json.loads(ended.stdout)["token_ids"] == []
    assert json.loads(ended.stdout)["done_reason"] == "stop"
    kept = runner.invoke(app, [model_path, "-p", "Hi", "-n", "4", "--json", "-l", "151645+100", "--ignore-eos"])
    out = json.loads(kept.stdout)
    assert kept.exit_code == 0 and len(out["token_ids"]) == 4 and out["done_reason"] == "length"
    assert not {151643, 151645} & set(out["token_ids"])


def test_llama_cpp_flag_names(model_path):
    """llama.cpp's names (-p, -n/--n-predict, --temp, -s, -c, -sys, -t, -ngl) do what the long
    ones do; -n -1 generates until the answer ends or the context is full."""
    long = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "5", "--temperature", "0.8", "--seed",
                               "3", "--ctx-size", "256", "--system", "Be brief.", "--json"])
    threads = torch.get_num_threads()
    try:
        short = runner.invoke(app, [model_path, "-p", "Hi", "-n", "5", "--temp", "0.8", "-s", "3", "-c", "256", "-sys",
                                    "Be brief.", "-t", "1", "--json"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert long.exit_code == short.exit_code == 0, short.stderr
    assert json.loads(short.stdout)["token_ids"] == json.loads(long.stdout)["token_ids"]
    assert json.loads(short.stdout)["prompt_tokens"] == json.loads(long.stdout)["prompt_tokens"]
    other = runner.invoke(app, [model_path, "-p", "Hi", "--n-predict", "5", "--json", "--system-prompt", "Be brief."])
    assert other.exit_code == 0 and len(json.loads(other.stdout)["token_ids"]) == 5
    full = runner.invoke(app, [model_path, "-p", "Hi", "-n", "-1", "-c", "64", "--json"])  # no end-of-turn soon
    out = json.loads(full.stdout)
    assert out["prompt_tokens"] + len(out["token_ids"]) == 64 + 1  # the last token sampled, never fed back


@pytest.mark.parametrize("args,expect", [
    (["{model}", "--image", "/nonexistent.png"], "image not found"),
    (["{model}", "--image", "{junk}"], "not a readable image"),
    (["{model}", "--image", "{image}", "--image", "{thin}"], "thin.png: aspect ratio 667:1 is beyond 200:1"),
    (["{junk}", "--prompt", "x"], "not a GGUF"),
    (["{truncated}", "--prompt", "x"], "truncated"),
    (["{mmproj}", "--prompt", "x"], "not a Qwen2-VL text model"),
    (["{model}", "--video", "clip.mp4"], "video not found"),
    (["{model}", "-p", "x", "-f", "{junk}"], "--prompt and --file: choose one"),
    (["{model}", "-f", "/nowhere/q.txt"], "/nowhere/q.txt: file not found"),
    (["{model}", "-f", "{tmp}"], "Is a directory"),
    (["{model}", "--image", "{tmp}"], "is a folder, not an image"),
    (["{model}", "--video", "{tmp}"], "is a folder, not a video"),
    (["{model}", "--prompt", "x", "--mmproj", "{tmp}"], "is a folder, not a mmproj file"),
    (["{model}", "--prompt", "x", "--mmproj", "/nowhere/mmproj.gguf"], "mmproj file not found"),
    (["{model}", "--video", "{junk}"], "not a readable video"),
    (["{model}", "--prompt", "word " * 300, "--ctx-size", "64"], "does not fit a context of 64"),
    (["{model}", "--prompt", "{image2} here", "--image", "{image}"], "refers to {image2}"),
    (["{model}", "--prompt", "x", "--cache-type", "q4"], "--cache-type q4: choose f32, bf16, f16, q8_0"),
    (["{model}", "--prompt", "x", "--vision-device", "tpu"], "--vision-device tpu: choose"),
    (["{model}", "--prompt", "x", "--max-vram", "0"], "--max-vram 0.0: a budget"),
    (["{model}", "--prompt", "x", "--gpu-layers", "-1"], "--gpu-layers -1: 0 or more"),
    (["{model}", "--prompt", "x", "--cpu", "--gpu-layers", "4"], "--cpu with --gpu-layers: choose one"),
    (["{model}", "--prompt", "x", "--int8-activations", "--no-triton"], "--int8-activations needs the Triton kernels"),
    (["{model}", "--prompt", "x", "--vision-stream", "--vision-device", "cpu"], "not with --vision-device cpu"),
    (["/nowhere/model.gguf", "--prompt", "x"], "/nowhere/model.gguf: file not found"),
    (["missing.gguf", "--prompt", "x"], "missing.gguf: file not found"),  # a file name, never pulled
    (["{model}", "--prompt", "x", "--temperature", "1", "--top-p", "2"], "top_p 2.0: between 0 and 1"),
    (["{model}", "--prompt", "x", "--top-k", "-3"], "top_k -3: 0 (off) or more"),
    (["{model}", "--prompt", "x", "--min-p", "5"], "min_p 5.0: between 0 (off) and 1"),
    (["{model}", "--prompt", "x", "--repeat-penalty", "0"], "repeat_penalty 0.0: above 0"),
    (["{model}", "--prompt", "x", "--repeat-last-n", "-2"], "repeat_last_n -2: -1"),
    (["{model}", "--prompt", "x", "--temperature", "nan"], "temperature nan: a finite number"),
    (["{model}", "--prompt", "x", "--presence-penalty", "inf"], "presence_penalty inf: a finite number"),
    (["{model}", "--prompt", "x", "--logit-bias", "12x3"], "--logit-bias '12x3': TOKEN_ID(+/-)BIAS"),
    (["{model}", "--prompt", "x", "--samplers", "top_k;infill"], "--samplers: infill is a sampler qvl does not have"),
    (["{model}", "--prompt", "x", "--dry-multiplier", "1", "--dry-penalty-last-n", "-2"], "dry_penalty_last_n -2: -1"),
    (["{model}", "--prompt", "x", "--sampling-seq", "kz"], "--sampling-seq 'kz': 'z' is not a sampler's character"),
    (["{model}", "--prompt", "x", "--samplers", "top_k", "--sampling-seq", "k"], "--samplers and --sampling-seq"),
    (["{model}", "--prompt", "x", "--xtc-probability", "2"], "xtc_probability 2.0: between 0 and 1"),
    (["{model}", "--prompt", "x", "--mirostat", "3"], "mirostat 3: 0 (off), 1 or 2"),
    (["{model}", "--prompt", "x", "--adaptive-target", "2"], "adaptive_target 2.0: 1 or below"),
    (["{model}", "--prompt", "x", "--ignore-eos", "--format", "json"], "--ignore-eos with --format or --grammar"),
    (["{model}", "--prompt", "x", "--logit-bias", "99999999+1"], "logit_bias 99999999: not a token id of this model"),
    (["{model}", "--prompt", "x", "--max-length", "-3"], "--max-length -3: 0 or more, or -1"),
    (["{model}", "--prompt", "x", "-t", "0"], "--threads 0: 1 or more"),
    (["{model}", "--prompt", "x", "--ctx-size", "-5"], "--ctx-size -5: 0"),
    (["{model}", "--image", "{image}", "--min-pixels", "2000", "--max-pixels", "1000"],
     "--min-pixels 2000, --max-pixels 1000: want 0 < max and min <= max"),
    (["{model}", "--image", "{image}", "--max-pixels", "0"], "--max-pixels 0: want 0 < max"),
    (["{model}", "--video", "{image}", "--video-fps", "0"], "fps 0.0: frames a second must be above 0"),
    (["{model}", "--video", "{image}", "--max-frames", "1"], "max_frames 1: at least 2"),
    (["{model}", "--video", "{image}", "--video-min-pixels", "9", "--video-max-pixels", "8"],
     "frame pixel limits min 9, max 8"),
    (["{model}", "--video", "{image}"], "1 frame(s); a video needs 2 or more"),
])
def test_bad_input(tmp_path, fixtures_dir, model_path, image_path, args, expect):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not a thing")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(open(model_path, "rb").read()[:20_000_000])
    thin = tmp_path / "thin.png"
    Image.new("RGB", (2000, 3)).save(thin)
    subst = {"model": model_path, "tmp": str(tmp_path), "junk": str(junk), "truncated": str(truncated), "image": image_path,
             "thin": str(thin), "mmproj": str(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "mmproj-tiny-qwen2.5-vl-f16.gguf")}
    r = runner.invoke(app, [a.format(**subst) if a.startswith("{") and a.endswith("}") and a[1:-1] in subst else a
                            for a in args])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvl-run: error:") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without a GPU")
def test_gpu_flags_without_a_gpu_warn_and_run_on_the_cpu(model_path):
    base = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "6"])
    r = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "6", "--gpu-layers", "99",
                            "--max-vram", "4", "--vision-device", "cuda", "--int8-activations", "--vision-stream",
                            "--no-op-offload"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.strip() == ("qvl-run: warning: no CUDA GPU found; --gpu-layers, --max-vram, --vision-device cuda, "
                                "--int8-activations, --vision-stream, --no-prefill-offload ignored, running on the CPU")
    assert r.stdout == base.stdout


def _fake_gpu(monkeypatch, capability=(8, 6), name="GPU", probe_failure=None) -> list:
    """torch sees a GPU of `capability` named `name`, on which the Triton probe kernel
    (kernels/probe.py) fails with `probe_failure` (None: it runs). Returns the probe's calls."""
    from qvl.kernels import probe

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(probe, "failure", lambda device: calls.append(device) or probe_failure)
    monkeypatch.setattr(probe, "_checked", {})
    return calls


@pytest.mark.parametrize("capability,kernels", [((6, 1), False), ((7, 0), True), ((9, 0), True)])
def test_gpus_older_than_triton_take_the_torch_path(monkeypatch, capsys, capability, kernels):
    """A Pascal card (Triton compiles for 7.0 and later) runs torch matmuls on the GPU, with one
    warning that names it; newer ones keep the kernels."""
    from qvl.runtime import run_cli

    _fake_gpu(monkeypatch, capability, "NVIDIA GeForce GTX 1080")
    device, placement = run_cli._placement(False, None, "auto", None, False, None, False)
    assert device == "cuda" and placement.accel == "cuda" and placement.kernels == kernels
    err = capsys.readouterr().err
    if kernels:
        assert err == ""
    else:
        assert err.strip() == ("qvl-run: warning: NVIDIA GeForce GTX 1080 (compute capability 6.1) is older than "
                               "Triton supports (7.0); using torch matmuls on the GPU (as --no-triton)")


def test_a_gpu_where_the_kernels_do_not_run_takes_the_torch_path(monkeypatch, capsys):
    """Where Triton's probe kernel fails (no C compiler for its launcher, a GPU its ptxas does not
    know), one warning names the GPU and the reason and the torch matmuls run on the GPU; with
    --no-triton, or on a GPU Triton does not support, the probe is not tried."""
    from qvl.runtime import run_cli

    why = "RuntimeError: Failed to find C compiler. Please specify via CC environment variable."
    calls = _fake_gpu(monkeypatch, (12, 0), "NVIDIA GeForce RTX 5090", why)
    device, placement = run_cli._placement(False, None, "auto", None, False, None, False, int8=True)
    assert device == "cuda" and placement.accel == "cuda" and not placement.kernels
    assert [str(d) for d in calls] == ["cuda"]
    assert capsys.readouterr().err.splitlines() == [
        f"qvl-run: warning: the Triton kernels do not run on NVIDIA GeForce RTX 5090 ({why}); using torch matmuls "
        "on the GPU (as --no-triton)",
        "qvl-run: warning: --int8-activations ignored: the Triton kernels do not run here"]
    assert not run_cli._placement(False, None, "auto", None, True, None, False)[1].kernels  # --no-triton
    calls = _fake_gpu(monkeypatch, (6, 1), "NVIDIA GeForce GTX 1080", why)
    assert not run_cli._placement(False, None, "auto", None, False, None, False)[1].kernels
    assert calls == []
    calls = _fake_gpu(monkeypatch, (9, 0), "NVIDIA H100", None)
    assert run_cli._placement(False, None, "auto", None, False, None, False)[1].kernels and len(calls) == 1


def test_qvl_run_tries_the_probe_kernel_once(model_path, monkeypatch):
    """qvl-run asks whether the kernels run before it loads the model, and load asks again: the
    probe kernel is launched once, and both take its answer."""
    from qvl.runtime import loader as loader_mod
    from qvl.runtime import run_cli

    why = "RuntimeError: Failed to find C compiler."
    calls = _fake_gpu(monkeypatch, (12, 0), "NVIDIA GeForce RTX 5090", why)
    opened = []
    monkeypatch.setattr(loader_mod, "_open", lambda path, fast, mmproj, placement, budget, ctx, lora:
                        opened.append(placement))
    monkeypatch.setattr(loader_mod, "give_back_free_memory", lambda: None)
    _, placement = run_cli._placement(False, None, "auto", None, False, None, False)
    with pytest.warns(UserWarning, match="Failed to find C compiler"):  # the same answer, not tried again
        loader_mod.load(model_path, device="cuda", placement=replace(placement, kernels=True))
    assert len(calls) == 1 and not placement.kernels and not opened[-1].kernels
    calls = _fake_gpu(monkeypatch, (9, 0), "NVIDIA H100", None)
    _, placement = run_cli._placement(False, None, "auto", None, False, None, False)
    loader_mod.load(model_path, device="cuda", placement=placement)
    assert len(calls) == 1 and placement.kernels and opened[-1].kernels


@pytest.mark.parametrize("capability,why", [((12, 0), "RuntimeError: Failed to find C compiler."),
                                             ((6, 1), None), ((9, 0), None)])
def test_load_in_python_falls_back_as_qvl_run_does(monkeypatch, capability, why):
    """qvl.load(device="cuda") probes the GPU as qvl-run does: where the kernels cannot run there,
    a warning that says why and a placement with torch's matmuls; where they can, the
    placement asked for. A placement without the kernels is not probed."""
    from qvl.runtime import loader as loader_mod

    calls = _fake_gpu(monkeypatch, capability, "NVIDIA GeForce RTX 5090", why)
    opened = []
    monkeypatch.setattr(loader_mod, "_open", lambda path, fast, mmproj, placement, budget, ctx, lora:
                        opened.append(placement))
    monkeypatch.setattr(loader_mod, "give_back_free_memory", lambda: None)
    runs = capability >= (7, 0) and why is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader_mod.load("m.gguf", device="cuda")
    assert opened[-1].accel == "cuda" and opened[-1].kernels == runs
    assert len(calls) == (capability >= (7, 0))
    messages = [str(w.message) for w in caught]
    if runs:
        assert messages == []
    elif why is not None:
        assert messages == [f"the Triton kernels do not run on NVIDIA GeForce RTX 5090 ({why}); using torch "
                            "matmuls on the GPU (as kernels=False)"]
    else:
        assert messages == ["NVIDIA GeForce RTX 5090 (compute capability 6.1) is older than Triton supports (7.0); "
                            "using torch matmuls on the GPU (as kernels=False)"]
    loader_mod.load("m.gguf", device="cuda", placement=loader_mod.Placement("cuda", 4, kernels=False))
    assert not opened[-1].kernels and len(calls) == (capability >= (7, 0))


def test_the_probe_kernel_runs_and_reports_what_stops_it(monkeypatch):
    """kernels/probe.py: here (Triton's interpreter) the probe computes its values; a launch that
    raises, or a kernel that writes wrong values, is one line naming what went wrong."""
    import interpret  # noqa: F401  (Triton's interpreter without a GPU)
    from interpret import ACCEL

    from qvl.kernels import probe

    device = torch.device(ACCEL)
    assert probe.failure(device) is None

    def fails(x, y):
        raise RuntimeError("ptxas fatal   : Value 'sm_120' is not defined for option 'gpu-name'\nmore")

    monkeypatch.setattr(probe, "_launch", fails)
    assert probe.failure(device) == "RuntimeError: ptxas fatal   : Value 'sm_120' is not defined for option 'gpu-name'"
    monkeypatch.setattr(probe, "_launch", lambda x, y: y.copy_(x))
    assert probe.failure(device) == "a test kernel computed wrong values"


@pytest.mark.parametrize("capability,int8", [((9, 0), True), ((6, 1), False)])
def test_int8_activations_where_the_kernels_run(monkeypatch, capsys, capability, int8):
    """--int8-activations turns on the int8-activation GEMVs (q8_activations.ENABLED) on a GPU
    that runs the Triton kernels; on one that does not, a warning says it is ignored."""
    from qvl.kernels import q8_activations
    from qvl.runtime import run_cli

    _fake_gpu(monkeypatch, capability)
    monkeypatch.setattr(q8_activations, "ENABLED", False)
    device, placement = run_cli._placement(False, None, "auto", None, False, None, False, int8=True)
    assert device == "cuda" and q8_activations.ENABLED == int8 == placement.kernels
    assert ("--int8-activations ignored" in capsys.readouterr().err) != int8


def test_vision_stream_and_prefill_offload_on_a_gpu(monkeypatch):
    from qvl.runtime import run_cli

    _fake_gpu(monkeypatch)
    device, placement = run_cli._placement(False, None, "auto", None, False, None, False, vision_stream=True)
    assert device == "cuda" and placement.vision_stream and placement.vision_on_accel and placement.prefill_offload
    default = run_cli._placement(False, None, "auto", None, False, None, False)[1]
    assert not default.vision_stream and default.prefill_offload
    assert not run_cli._placement(False, 20, "auto", None, False, None, False, no_prefill_offload=True)[1].prefill_offload


def test_q8_0_cache_runs(model_path):
    r = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "6", "--cache-type", "q8_0", "--json"])
    assert r.exit_code == 0, r.stderr
    assert len(json.loads(r.stdout)["token_ids"]) == 6


def test_fitting_to_free_memory_only_without_layer_or_budget_flags(monkeypatch):
    """Without --gpu-layers or --max-vram the GPU placement fits what the GPU has free (Model
    plans for it when the whole model does not fit); either flag says it, and is kept."""
    from qvl.runtime import run_cli

    _fake_gpu(monkeypatch)
    assert run_cli._placement(False, None, "auto", None, False, None, False)[1].fit_free
    assert not run_cli._placement(False, 28, "auto", None, False, None, False)[1].fit_free
    assert not run_cli._placement(False, None, "auto", 6.0, False, None, False)[1].fit_free


@pytest.mark.parametrize("free_gib,note", [(1 << 10, None), (0.3, "running on the CPU")])
def test_the_fit_is_reported_in_one_warning(model_path, monkeypatch, free_gib, note):
    """What fitting to the GPU's free memory changed is one warning line; the answer is the same.
    (The CPU stands in for the GPU: the placement's accelerator is the CPU.)"""
    from qvl.runtime import fit
    from qvl.runtime import run_cli
    from qvl.runtime.placement import Placement

    monkeypatch.setattr(run_cli, "_placement", lambda *a, **k: ("cpu", Placement(
        "cpu", 1 << 20, vision_on_accel=True, kernels=False, kv_type="f32", fit_free=True)))
    monkeypatch.setattr(fit, "free_bytes", lambda accel: int(free_gib * 2**30))
    r = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "4", "--json"])
    assert r.exit_code == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("qvl-run: warning:")]
    if note is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and note in warnings[0] and "GiB is free there" in warnings[0]
    plain = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "4", "--json", "--cpu"])
    assert json.loads(r.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]


@pytest.mark.parametrize("raised", ["triton's type", "in triton's code", "the model's KernelFailure", "elsewhere"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_kernel_triton_cannot_build_is_one_line(model_path, monkeypatch, raised, stream):
    """An error Triton raises compiling or launching a kernel (its own type, or from inside its
    package: a compiler pass failing for this GPU; or the model's KernelFailure made of one) is
    one line naming it and --no-triton, exit 2; any other error is not turned into one."""
    import os

    import triton
    from triton.runtime.errors import OutOfResources

    from qvl.runtime.kernel_failure import KernelFailure
    from qvl.runtime.model import Model

    def fails(*args, **kwargs):
        if raised == "triton's type":
            raise OutOfResources(122880, 101376, "shared memory")
        if raised == "the model's KernelFailure":
            raise KernelFailure(OutOfResources(122880, 101376, "shared memory"))
        code = "raise RuntimeError('PassManager::run failed')"
        where = os.path.join(os.path.dirname(triton.__file__), "compiler", "compiler.py")
        exec(compile(code, where if raised == "in triton's code" else "elsewhere.py", "exec"))

    monkeypatch.setattr(Model, "generate", fails)
    r = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "4"] + (["--stream"] if stream else []))
    if raised == "elsewhere":
        assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)
        return
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvl-run: error: a Triton kernel failed on this GPU (")
    assert ("OutOfResources" in lines[0]) == (raised in ("triton's type", "the model's KernelFailure"))
    assert ("PassManager::run failed" in lines[0]) == (raised == "in triton's code")
    assert lines[0].endswith("--no-triton runs torch's matmuls on the GPU instead")
    assert "Traceback" not in r.output


@pytest.mark.parametrize("where", ["load", "generate"])
def test_out_of_gpu_memory_is_one_line(model_path, monkeypatch, where):
    from qvl.runtime import run_cli
    from qvl.runtime.model import Model

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if where == "load":
        monkeypatch.setattr(run_cli, "load", oom)
    else:
        monkeypatch.setattr(Model, "generate", oom)
    r = runner.invoke(app, [model_path, "--prompt", "Hi", "--max-length", "4"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvl-run: error: out of GPU memory ")
    assert ("loading the model" in lines[0]) == (where == "load") and "--max-vram" in lines[0]
    assert "Traceback" not in r.output


def test_a_prompt_after_the_model_as_ollama_run_takes_it(model_path, image_path):
    """`qvl-run MODEL "question ./a.png"`: the words are the question, the image file they name is
    attached (as --image) and leaves the text; a picture alone is asked the default question."""
    def ids(args):
        r = runner.invoke(app, [model_path, "-n", "4", "--json", *args])
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)["token_ids"], json.loads(r.stdout)["prompt_tokens"], r.stderr

    want = ids(["--image", image_path, "--prompt", "What colour is it?"])[:2]
    got = ids(["What colour", f"is it? {image_path}"])
    assert got[:2] == want and f"Added image '{image_path}'" in got[2]
    assert ids([image_path])[:2] == ids(["--image", image_path, "--prompt", DEFAULT_PROMPT])[:2]
    assert ids(["Why is the sky blue?"])[:2] == ids(["--prompt", "Why is the sky blue?"])[:2]
    piped = runner.invoke(app, [model_path, "-n", "4", "--json", "Why is it blue?"], input="The sky.\n")
    assert json.loads(piped.stdout)["token_ids"] == ids(["--prompt", "The sky. Why is it blue?"])[0]  # stdin first
    r = runner.invoke(app, [model_path, "Hi", "--prompt", "Hi"])
    assert r.exit_code == 2 and "a PROMPT after MODEL and --prompt: choose one" in r.stderr
