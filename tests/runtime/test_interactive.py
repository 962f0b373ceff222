"""qvl-run's terminal chat (chat_cli.interactive): its slash commands and what each turn hands the model.
The model is a stand-in that records its calls: this checks the chat loop, not generation."""

from __future__ import annotations

import builtins
from types import SimpleNamespace

import pytest
from PIL import Image

from qvl.runtime import chat_cli, run_cli


class Recorder:
    """Model.chat's signature; answers "ok" and keeps each call's messages and keyword arguments."""

    def __init__(self, files=()):
        self.calls: list[tuple[list[dict], dict]] = []
        self.files = [SimpleNamespace(path=f) for f in files]  # the GGUFs /save stores
        self.defaults = {"messages": [{"role": "user", "content": "stored first"}]}
        self.vision = object()  # a model that sees pictures

    def chat(self, messages, stream=False, **kwargs):
        self.calls.append(([dict(m) for m in messages], dict(kwargs)))
        yield "ok"


def _chat(monkeypatch, capsys, lines, system=None, images=(), files=(), verbose=False, history=None):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    model = Recorder(files)
    gen_kwargs = dict(max_new_tokens=512, temperature=None, top_p=None, top_k=None, min_p=None, repeat_penalty=1.0,
                      repeat_last_n=64, seed=1, ctx_size=None, stop=[], min_pixels=1, max_pixels=2, videos=[])
    chat_cli.interactive(model, gen_kwargs, list(images), system, history=history, verbose=verbose)
    out = capsys.readouterr()
    return model.calls, out.out, out.err


def test_set_parameter_and_show(monkeypatch, capsys):
    calls, out, err = _chat(monkeypatch, capsys, [
        "/set parameter temperature 0.5", "/set parameter NUM_PREDICT 7", "/set parameter top_k 2.5",
        "/set parameter mirostat 1", "/set parameter tfs_z 1", "/set parameter stop <|im_end|>", "/set parameter seed",
        "/show parameters",
        "hello", "/set parameter num_predict -1", "again"])
    assert out == "ok\nok\n"
    (_, first), (_, second) = calls
    assert first["temperature"] == 0.5 and first["max_new_tokens"] == 7 and first["top_k"] is None
    assert first["stop"] == ["<|im_end|>"]
    assert "videos" not in first
    assert second["max_new_tokens"] == second["ctx_size"] == run_cli.PLAN_CTX  # as -n -1
    assert "(set temperature to 0.5)" in err and "(set num_predict to 7)" in err
    assert "qvl-run: error: PARAMETER top_k '2.5': an integer" in err
    assert "qvl-run: error: PARAMETER tfs_z: qvl does not use it" in err
    assert first["chain"].mirostat == 1 and "(set mirostat to 1)" in err and "mirostat        1" in err
    assert "typical_p       (default)" in err
    assert "(set stop to <|im_end|>)" in err and 'stop            "<|im_end|>"' in err
    assert "usage: /set parameter NAME VALUE" in err
    assert "temperature     0.5" in err and "num_predict     7" in err and "top_p           (default)" in err


def test_system_image_clear_bye(monkeypatch, capsys, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    calls, out, err = _chat(monkeypatch, capsys, [
        "first", "/set system Be brief.", "second", f"/image {tmp_path}", f"/image {tmp_path / 'none.png'}",
        f"/image {img}", "third", "/clear", "fourth", "/nonsense", "/bye", "never read"], system="Old.")
    assert [c[0][0] for c in calls] == [{"role": "system", "content": "Old."}] + \
        [{"role": "system", "content": "Be brief."}] * 3  # /set system replaces it; /clear keeps it
    assert [m["role"] for m in calls[1][0]] == ["system", "user", "assistant", "user"]  # the turns stay
    third = calls[2][0][-1]["content"]
    assert third == [{"type": "image", "image": str(img)}, {"type": "text", "text": "third"}]
    assert [m["role"] for m in calls[3][0]] == ["system", "user"]
    assert calls[3][0][-1]["content"] == [{"type": "text", "text": "fourth"}]  # the image went with "third"
    assert f"{tmp_path}: is a folder, not an image" in err and "none.png: image not found" in err
    assert "unknown command '/nonsense'" in err
    assert len(calls) == 4 and out == "ok\n" * 4


def test_pictures_given_on_the_command_line_go_with_the_first_message(monkeypatch, capsys, tmp_path):
    calls, _, _ = _chat(monkeypatch, capsys, ["look", "more"], images=["x.png"])
    assert calls[0][0][-1]["content"][0] == {"type": "image", "image": "x.png"}
    assert all(c.get("type") != "image" for c in calls[1][0][-1]["content"])


def test_set_format_json_and_noformat(monkeypatch, capsys):
    calls, out, err = _chat(monkeypatch, capsys, ["one", "/set format json", "two", "/set format yaml",
                                                  "/set noformat", "three"])
    assert [kwargs.get("format") for _, kwargs in calls] == [None, "json", None]
    assert "(answers are one JSON object)" in err and "(answers are free text)" in err
    assert "usage: /set parameter NAME VALUE, /set system TEXT, /set format json or /set noformat" in err


def test_save_stores_the_conversation(monkeypatch, capsys, tmp_path, fixtures_dir):
    """`/save NAME` (Ollama's): this model's files under a new name, with the stored conversation
    and this one's turns as MESSAGEs (their text), the system prompt and the /set parameters."""
    from qvl.runtime.store import Store

    monkeypatch.setenv("QVL_MODELS", str(tmp_path / "models"))
    gguf = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    _, _, err = _chat(monkeypatch, capsys, [
        "/set system Be brief.", "/set parameter temperature 0.3", f"/image {img}", "hello", "/save me/chat:1",
        "/save ../bad"], files=[gguf / "tiny-qwen2.5-vl-f16.gguf", gguf / "mmproj-tiny-qwen2.5-vl-f16.gguf"])
    assert "(saved as me/chat:1; its pictures are not kept)" in err, err
    assert "qvl-run: error:" in err and "invalid" in err
    store = Store()
    entry = store.get("me/chat:1")
    assert store.messages(entry) == [{"role": "user", "content": "stored first"}, {"role": "user", "content": "hello"},
                                     {"role": "assistant", "content": "ok"}]
    assert store.text(entry, "system") == "Be brief." and store.params(entry) == {"temperature": 0.3}
    model, projector = store.resolve("me/chat:1")
    assert model.read_bytes() == (gguf / "tiny-qwen2.5-vl-f16.gguf").read_bytes() and projector is not None


def test_boxes_draws_the_last_answers_boxes_on_the_last_picture(monkeypatch, capsys, tmp_path):
    """/boxes FILE: the stand-in's last answer gives one box in the seen picture's pixels (140x84
    for a 130x90 picture); it is drawn on the last picture in that picture's pixels."""
    from qvl.runtime.grounding import PALETTE
    from qvl.runtime.model import Generation

    first, last = tmp_path / "first.png", tmp_path / "last.png"
    Image.new("RGB", (40, 40), (0, 0, 0)).save(first)
    Image.new("RGB", (130, 90), (128, 128, 128)).save(last)
    answer = '[{"bbox_2d": [28, 14, 84, 70], "label": "cat"}]'
    monkeypatch.setattr(Recorder, "vision_cfg", SimpleNamespace(qwen2_5=True), raising=False)
    monkeypatch.setattr(Recorder, "tokenizer", SimpleNamespace(decode=lambda ids, skip_special_tokens: answer),
                        raising=False)
    monkeypatch.setattr(Recorder, "last_generation", None, raising=False)
    out_png = tmp_path / "out.png"
    lines = ["/boxes " + str(out_png), f"/image {first}", "one", f"/image {last}", "two",
             "/boxes " + str(out_png), "/boxes " + str(tmp_path / "out.nope")]
    feed = iter(lines)

    def fake_input(prompt=""):
        line = next(feed, None)
        if line is None:
            raise EOFError
        if line == "two":  # what the model answered about both pictures
            Recorder.last_generation = Generation(answer, [1, 2, 3], 40, image_sizes=[(56, 56), (84, 140)])
        return line

    monkeypatch.setattr(builtins, "input", fake_input)
    chat_cli.interactive(Recorder(), dict(seed=1), [], None)
    err = capsys.readouterr().err
    assert "(no answer about a picture yet)" in err
    assert f"(1 box drawn on {out_png})" in err
    assert "qvl-run: error: " in err and "no image format has the extension '.nope'" in err
    img = Image.open(out_png).convert("RGB")
    assert img.size == (130, 90) and img.getpixel((26, 45)) == PALETTE[0] and img.getpixel((52, 45)) == (128,) * 3


def test_show_info_system_template(monkeypatch, capsys, fixtures_dir):
    """/show info (qvl show's rows, from the loaded files), system, template, as Ollama's."""
    from qvl.runtime.loader import load
    from qvl.runtime.ollama_template import OllamaTemplate

    model = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf", device="cpu")
    info = chat_cli.chat_show(model, "info", {}, [], {})
    assert "architecture      qwen2vl" in info and "quantization      MOSTLY_F16" in info
    assert "projector         qwen2.5vl_merger" in info and "parameters        10M" in info
    assert chat_cli.chat_show(model, "system", {}, [], {}) == "(no system prompt)"
    model.defaults = {"system": "Stored."}
    assert chat_cli.chat_show(model, "system", {}, [], {}) == "Stored."
    assert chat_cli.chat_show(model, "system", {}, [{"role": "system", "content": "Mine."}], {}) == "Mine."
    shown = chat_cli.chat_show(model, "template", {}, [], {})
    assert shown == model.chat_template and "im_start" in model.chat_template
    model.chat_template = OllamaTemplate("{{ .Prompt }}")
    assert chat_cli.chat_show(model, "template", {}, [], {}) == "{{ .Prompt }}"
    assert chat_cli.chat_show(model, "nope", {}, [], {}).startswith("usage: /show info")
    assert chat_cli.chat_show(model, "license", {}, [], {}) == "No license was specified for this model."
    _, _, err = _chat(monkeypatch, capsys, ["/show system", "/show"], system="Old.")
    assert "Old.\n" in err and "usage: /show info, license, modelfile, parameters" in err


def test_show_modelfile_reads_back_to_this_chat(fixtures_dir):
    """/show modelfile: FROM the loaded files, the /set parameters, the system prompt and the
    conversation's text as MESSAGEs; the Modelfile parser reads it back to the same."""
    from qvl.runtime.loader import load
    from qvl.runtime.modelfile import parse

    model = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf", device="cpu")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello."}]
    text = chat_cli.chat_show(model, "modelfile", {}, messages, {"temperature": 0.5, "stop": ["x"]})
    mf = parse(text)
    assert mf.sources == tuple(str(f.path) for f in model.files) and len(mf.sources) == 2
    assert mf.system == "Be brief." and mf.params == {"temperature": 0.5, "stop": ["x"]}
    assert mf.messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."})


def test_image_files_named_in_a_line_go_with_it(monkeypatch, capsys, tmp_path):
    """As `ollama run`: a typed line's image paths (escaped spaces too) are attached and leave the
    text; a path that names no file stays text; a model without vision takes the line as it is."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.JPG")
    spaced = str(tmp_path / "a b.png").replace(" ", "\\ ")
    calls, out, err = _chat(monkeypatch, capsys, [f"compare {spaced} and {tmp_path}/c.JPG please",
                                                  f"and {tmp_path}/none.png?"])
    (first, _), (second, _) = calls
    assert first[0]["content"] == [{"type": "image", "image": str(tmp_path / "a b.png")},
                                   {"type": "image", "image": f"{tmp_path}/c.JPG"},
                                   {"type": "text", "text": "compare  and  please"}]
    assert second[-1]["content"] == [{"type": "text", "text": f"and {tmp_path}/none.png?"}]
    assert err.count("Added image") == 2 and f"Added image '{tmp_path / 'a b.png'}'" in err
    monkeypatch.setattr(Recorder, "__init__", _blind_init)
    calls, _, err = _chat(monkeypatch, capsys, [f"what is {tmp_path}/c.JPG"])
    assert calls[0][0][-1]["content"] == [{"type": "text", "text": f"what is {tmp_path}/c.JPG"}]
    assert "Added image" not in err


_init = Recorder.__init__


def _blind_init(self, files=()):
    _init(self, files)
    self.vision = None


def test_a_message_of_several_lines_between_triple_quotes(monkeypatch, capsys):
    """As in `ollama run`: \"\"\" opens a message of several lines and \"\"\" ends it; one between
    quotes on one line is text too, never a command."""
    calls, out, _ = _chat(monkeypatch, capsys, ['"""first line', "  second", 'third"""', '"""/bye"""', "  last  "])
    texts = [c[0][-1]["content"][-1]["text"] for c in calls]
    assert texts == ["first line\n  second\nthird", "/bye", "last"] and out == "ok\nok\nok\n"


def test_set_verbose_prints_ollamas_figures(monkeypatch, capsys):
    made = SimpleNamespace(prompt_tokens=40, token_ids=[1, 2, 3],
                           timings={"prefill_s": 0.5, "vision_ms": 300.0, "decode_s": 0.25})
    monkeypatch.setattr(Recorder, "last_generation", made, raising=False)
    _, _, quiet = _chat(monkeypatch, capsys, ["hello"])
    assert "eval rate" not in quiet
    _, _, err = _chat(monkeypatch, capsys, ["/set verbose", "hello", "/set quiet", "again"])
    assert "Set 'verbose' mode." in err and "Set 'quiet' mode." in err and err.count("\neval rate:") == 1
    for line in ("prompt eval count:    40 token(s)", "prompt eval duration: 800ms",
                 "prompt eval rate:     50.00 tokens/s", "eval count:           3 token(s)",
                 "eval duration:        250ms", "eval rate:            12.00 tokens/s"):
        assert line in err, err
    assert "total duration:" in err
    _, _, err = _chat(monkeypatch, capsys, ["hello"], verbose=True)  # qvl-run --verbose
    assert err.count("\neval rate:") == 1


def test_go_durations():
    assert [chat_cli.go_duration(s) for s in (2.0, 1.25, 0.1312, 4.5e-5, 0.0)] == ["2s", "1.25s", "131.2ms", "45µs",
                                                                                    "0µs"]


def test_the_history_file(monkeypatch, tmp_path):
    from qvl.runtime import chat_input

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("QVL_NOHISTORY", raising=False)
    assert chat_input.history_path() == tmp_path / ".qvl" / "history"
    monkeypatch.setenv("QVL_NOHISTORY", "1")
    assert chat_input.history_path() is None
    if chat_input._readline() is None:
        pytest.skip("this Python has no readline")
    history = tmp_path / "new" / "history"
    reader = chat_input.LineReader(history)
    reader._readline.add_history("an earlier message")
    reader.close()
    assert "an earlier message" in history.read_text()
    reader._readline.clear_history()
    chat_input.LineReader(history)  # read back
    assert reader._readline.get_history_item(reader._readline.get_current_history_length()) == "an earlier message"


def test_on_a_terminal_the_prompts_reading_is_shown(monkeypatch, capsys):
    """Where stderr is a terminal the chat asks for the prompt's progress and shows it until the
    answer's first piece; the answer kept in the conversation is its text alone."""
    from qvl.runtime import answer_stream
    from qvl.runtime.live import PromptProgress

    def chat(self, messages, stream=False, **kwargs):
        self.calls.append(([dict(m) for m in messages], dict(kwargs)))
        yield PromptProgress(40, 0, 40, 5)
        yield "ok"

    monkeypatch.setattr(Recorder, "chat", chat)
    monkeypatch.setattr(answer_stream, "on_terminal", lambda stream: True)
    calls, out, err = _chat(monkeypatch, capsys, ["hello", "again"])
    assert out == "ok\nok\n" and calls[0][1]["progress"] is True
    assert "reading the prompt: 40 of 40 tokens" in err
    assert calls[1][0][-2] == {"role": "assistant", "content": "ok"}
