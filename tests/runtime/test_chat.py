"""Chat template rendering identical to transformers' apply_chat_template; model.chat turns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvl.runtime.chat import render
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.loader import load

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]},
     {"role": "assistant", "content": "Two cats."}, {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]}],
]


@pytest.fixture(scope="module")
def template(fixtures_dir):
    with GGUFFile(fixtures_dir / "tiny-qwen2-vl" / "llamacpp" / "tiny-qwen2-vl-f16.gguf") as g:
        return g.get("tokenizer.chat_template")


@pytest.fixture(scope="module")
def hf_tokenizer(fixtures_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fixtures_dir / "tiny-qwen2-vl" / "hf")


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("vision_id", [False, True])
@pytest.mark.parametrize("gen_prompt", [False, True])
def test_render_equals_transformers(hf_tokenizer, template, conv, vision_id, gen_prompt):
    tok = hf_tokenizer
    msgs = CONVERSATIONS[conv]
    ref = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt, add_vision_id=vision_id)
    assert render(template, msgs, gen_prompt, vision_id) == ref
    assert render(None, msgs, gen_prompt, vision_id) == ref  # built-in template for files without one


def test_llama_cpp_fixture_and_our_conversion_agree(fixtures_dir, tmp_path):
    """llama.cpp's F16 pair and qvl-convert's F16 pair of the same checkpoint give the same logits."""
    from typer.testing import CliRunner

    from qvl.convert.cli import app

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    for model in ("tiny-qwen2.5-vl", "tiny-qwen2-vl"):
        ours_path = tmp_path / f"{model}.gguf"
        r = CliRunner().invoke(app, [str(fixtures_dir / model / "hf"), "-o", str(ours_path), "-q"])
        assert r.exit_code == 0, r.output
        theirs = load(fixtures_dir / model / "llamacpp" / f"{model}-f16.gguf").prompt_logits("Look: {image1} ok?", [img])
        ours = load(ours_path).prompt_logits("Look: {image1} ok?", [img])
        assert torch.equal(ours, theirs)


def test_multi_turn_chat(fixtures_dir, tmp_path):
    model = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((60, 60, 3), dtype=np.uint8)).save(path)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Hi"}]}]
    first = model.chat(msgs, max_new_tokens=4)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More?"}]
    second = model.chat(msgs, max_new_tokens=4)
    assert second.prompt_tokens > first.prompt_tokens + 4
    assert len(second.token_ids) <= 4


def test_ollama_single_file_gives_the_same_logits(fixtures_dir, tmp_path):
    """Ollama's one-file qwen25vl layout (text + vision in one GGUF) runs like llama.cpp's pair."""
    from typer.testing import CliRunner

    from qvl.convert.cli import app

    out = tmp_path / "ollama.gguf"
    r = CliRunner().invoke(app, [str(fixtures_dir / "tiny-qwen2.5-vl" / "hf"), "-o", str(out), "--layout", "ollama",
                                 "-q"])
    assert r.exit_code == 0, r.output
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    single = load(out)
    assert single.vision is not None and single.vision_cfg.layout == "ollama"
    pair = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    a = single.prompt_logits("Look: {image1} ok?", [img])
    b = pair.prompt_logits("Look: {image1} ok?", [img])
    assert torch.equal(a, b)


def test_a_chat_template_error_is_one_line():
    """The chat template's raise_exception, or one that does not parse: a TemplateError naming it,
    which qvl-run prints as one line and qvl serve answers with a 400."""
    from qvl.runtime.go_template import TemplateError

    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateError, match=r"^chat template \(tokenizer.chat_template\): roles must alternate$"):
        render("{{ raise_exception('roles must alternate') }}", messages)
    with pytest.raises(TemplateError, match=r"^chat template \(tokenizer.chat_template\): "):
        render("{% for m in messages %}", messages)


def test_count_chat_tokens_is_what_chat_reads(fixtures_dir, tmp_path):
    """count_chat_tokens (the token-count endpoints') equals the prompt_tokens chat reports, for
    text, pictures of two sizes, a video and a stored SYSTEM, without running the model."""
    from videos import make_video

    model = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    small, big = tmp_path / "s.png", tmp_path / "b.png"
    Image.fromarray(np.zeros((56, 84, 3), dtype=np.uint8)).save(small)
    Image.fromarray(np.zeros((112, 140, 3), dtype=np.uint8)).save(big)
    video = make_video(tmp_path / "v.mp4", frames=8, fps=4, size=(56, 84))
    text = [{"role": "user", "content": "Hi"}]
    pictures = [{"role": "user", "content": [{"type": "image", "image": str(small)}, {"type": "text", "text": "Hi"},
                                             {"type": "image", "image": str(big)}]}]
    film = [{"role": "user", "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": "Hi"}]}]
    counts = {}
    for name, msgs in (("text", text), ("pictures", pictures), ("video", film)):
        counts[name] = model.count_chat_tokens(msgs)
        assert counts[name] == model.chat(msgs, max_new_tokens=1).prompt_tokens, name
    # each picture: its merged patches ((56/28)*(84/28) = 6 and (112/28)*(140/28) = 20) and its start / end tokens
    assert counts["pictures"] - counts["text"] == (6 + 2) + (20 + 2)
    model.defaults = {**model.defaults, "system": "Be terse."}
    assert model.count_chat_tokens(text) == model.chat(text, max_new_tokens=1).prompt_tokens
