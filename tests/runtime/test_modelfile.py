"""Ollama's Modelfile: parsing, `qvl create -f`, `qvl show --modelfile`, and stored parameters as
qvl-run's defaults (flags given on the command line win)."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime import run_cli
from qvl.runtime.modelfile import USED, ModelfileError, check_params, parse, render
from qvl.runtime.run_cli import app as run_app
from qvl.runtime.store import Store

runner = CliRunner()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_MODELS", str(tmp_path / "models"))
    return Store()


@pytest.fixture
def folder(tmp_path, fixtures_dir):
    """The tiny Qwen2.5-VL pair copied into a folder of its own, where a Modelfile goes."""
    src = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"
    out = tmp_path / "files"
    out.mkdir()
    for name in ("tiny-qwen2.5-vl-f16.gguf", "mmproj-tiny-qwen2.5-vl-f16.gguf"):
        shutil.copy(src / name, out / name)
    return out


def test_parse():
    mf = parse('# comment\n'
               'from ./m.gguf\n'
               '  FROM   /abs/mmproj.gguf  \n'
               'PARAMETER temperature 0.25\n'
               'parameter TOP_K 40\n'
               'PARAMETER stop "<|im_end|>"\n'
               'PARAMETER stop <|endoftext|>\n'
               'PARAMETER num_ctx 8192\n'
               'SYSTEM """You are\n  terse."""\n'
               'TEMPLATE "say \\"hi\\""\n'
               'LICENSE bare words to the end\n'
               'REQUIRES 0.6.0\n')
    assert mf.sources == ("./m.gguf", "/abs/mmproj.gguf")
    assert mf.params == {"temperature": 0.25, "top_k": 40, "stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 8192}
    assert mf.system == "You are\n  terse."
    assert mf.template == 'say "hi"'
    assert mf.license == "bare words to the end"


@pytest.mark.parametrize("text,expect", [
    ("PARAMETER temperature 1", "no FROM line"),
    ("FROM m.gguf\nSTOP x", "line 2: 'STOP': an instruction is one of FROM"),
    ("FROM m.gguf\nADAPTER", "line 2: ADAPTER wants a value"),
    ("FROM m.gguf\nMESSAGE robot hi", "line 2: MESSAGE wants a role (system, user, assistant) and a text"),
    ("FROM m.gguf\nMESSAGE\nSYSTEM x", "line 2: MESSAGE wants a role"),
    ("FROM m.gguf\nPARAMETER tfs_z 2", "PARAMETER tfs_z: qvl does not use it"),
    ("FROM m.gguf\nPARAMETER mirostat 3", "PARAMETER mirostat 3: 0 (off), 1 or 2"),
    ("FROM m.gguf\nPARAMETER colour 2", "PARAMETER colour: unknown parameter"),
    ("FROM m.gguf\nPARAMETER top_k 1.5", "PARAMETER top_k '1.5': an integer"),
    ("FROM m.gguf\nPARAMETER temperature warm", "PARAMETER temperature 'warm': a number"),
    ("FROM m.gguf\nPARAMETER top_p 2", "PARAMETER top_p 2.0: between 0 and 1"),
    ("FROM m.gguf\nPARAMETER num_predict -2", "PARAMETER num_predict -2: 0 or more, or -1"),
    ("FROM m.gguf\nPARAMETER seed 1\nPARAMETER seed 2", "PARAMETER seed: given twice"),
    ("FROM m.gguf\nPARAMETER\nSYSTEM x", "line 2: PARAMETER wants a name and a value"),
    ('FROM m.gguf\nSYSTEM """never closed', 'line 2: """ not closed'),
    ('FROM m.gguf\nSYSTEM "half\nquoted"', 'line 2: " not closed on its line'),
    ("FROM m.gguf\nSYSTEM", "line 2: SYSTEM wants a value"),
])
def test_parse_errors(text, expect):
    with pytest.raises(ModelfileError) as e:
        parse(text)
    assert expect in str(e.value)


def test_render_reads_back():
    for system in ("plain", "two\nlines", 'has """ in it\nand a line', "trailing quote\""):
        params = {"temperature": 0.5, "num_predict": -1, "stop": ["<|im_end|>"]}
        messages = ({"role": "user", "content": system}, {"role": "assistant", "content": "ok"})
        text = render(["/a/m.gguf", "/a/p.gguf"], params, "{{ .Prompt }}", system, "MIT", "m:1", messages)
        mf = parse(text)
        assert (mf.sources, mf.params, mf.template, mf.system, mf.license, mf.messages) == \
               (("/a/m.gguf", "/a/p.gguf"), params, "{{ .Prompt }}", system, "MIT", messages)


def test_message_lines():
    mf = parse('FROM m.gguf\nMESSAGE user Is it blue?\nmessage ASSISTANT """Yes,\nblue."""\nMESSAGE system "be brief"\n')
    assert mf.messages == ({"role": "user", "content": "Is it blue?"}, {"role": "assistant", "content": "Yes,\nblue."},
                           {"role": "system", "content": "be brief"})


def test_stored_messages_come_before_every_prompt(store, folder):
    """MESSAGE lines are stored (Ollama's messages layer), shown, inherited by FROM the stored
    model, and every prompt follows them: generate and chat of the model loaded by name render
    the same conversation as the file's model given them in full."""
    from qvl.runtime.loader import load

    (folder / "Modelfile").write_text('FROM tiny-qwen2.5-vl-f16.gguf\nSYSTEM terse\nMESSAGE user Is the sky blue?\n'
                                      'MESSAGE assistant Yes.\n')
    assert runner.invoke(app, ["create", "fewshot:1", "-f", str(folder / "Modelfile")]).exit_code == 0
    shown = runner.invoke(app, ["show", "fewshot:1", "--modelfile"]).stdout
    assert 'MESSAGE user """Is the sky blue?"""' in shown and 'MESSAGE assistant """Yes."""' in shown
    assert "messages          2 (user, assistant)" in runner.invoke(app, ["show", "fewshot:1"]).stdout
    (folder / "Child").write_text("FROM fewshot:1\nPARAMETER seed 3\n")
    assert runner.invoke(app, ["create", "child:1", "-f", str(folder / "Child")]).exit_code == 0
    assert store.messages(store.get("child:1")) == [{"role": "user", "content": "Is the sky blue?"},
                                                    {"role": "assistant", "content": "Yes."}]
    named, plain = load("child:1"), load(folder / "tiny-qwen2.5-vl-f16.gguf")
    history = [{"role": "system", "content": "terse"}, {"role": "user", "content": "Is the sky blue?"},
               {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Is grass green?"}]
    want = plain.chat(history, max_new_tokens=6)
    assert named.generate("Is grass green?", max_new_tokens=6).token_ids == want.token_ids
    assert named.chat([{"role": "user", "content": "Is grass green?"}], max_new_tokens=6).token_ids == want.token_ids
    assert want.prompt_tokens > plain.generate("Is grass green?", system="terse", max_new_tokens=1).prompt_tokens


def test_pulled_params_keep_what_qvl_uses():
    """A registry's params layer: names qvl does not use are dropped, JSON numbers typed."""
    got = check_params({"temperature": 1, "top_k": 40.0, "tfs_z": 2, "mirostat": 2, "stop": ["<|im_end|>", "User:"]},
                       strict=False)
    assert got == {"temperature": 1.0, "top_k": 40, "mirostat": 2, "stop": ["<|im_end|>", "User:"]}
    with pytest.raises(ModelfileError, match="PARAMETER stop 3: strings"):
        check_params({"stop": 3}, strict=False)
    assert isinstance(got["temperature"], float) and isinstance(got["top_k"], int)
    with pytest.raises(ModelfileError, match="top_k 40.5"):
        check_params({"top_k": 40.5}, strict=False)
    with pytest.raises(ModelfileError, match="PARAMETER temperature True"):
        check_params({"temperature": True}, strict=False)


def test_used_parameters_name_run_arguments():
    args = inspect.signature(run_cli.run).parameters
    assert [arg for _, arg in USED.values() if arg not in args] == []


def _tokens(args: list[str]) -> list[int]:
    r = runner.invoke(run_app, [*args, "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["token_ids"]


def test_create_from_modelfile_and_run_with_its_defaults(store, folder):
    (folder / "Modelfile").write_text('FROM tiny-qwen2.5-vl-f16.gguf\nFROM ./mmproj-tiny-qwen2.5-vl-f16.gguf\n'
                                      'PARAMETER temperature 0.9\nPARAMETER seed 7\nPARAMETER num_predict 5\n'
                                      'SYSTEM """Answer in\none word."""\n')
    r = runner.invoke(app, ["create", "terse", "-f", str(folder / "Modelfile")])
    assert r.exit_code == 0, r.stderr
    kinds = [x["mediaType"].rsplit(".", 1)[1] for x in store.get("terse").manifest["layers"]]
    assert kinds == ["model", "projector", "system", "params"]
    shown = runner.invoke(app, ["show", "terse"]).stdout
    assert "system            Answer in one word." in shown and '"temperature": 0.9' in shown

    model = str(folder / "tiny-qwen2.5-vl-f16.gguf")
    explicit = ["--temperature", "0.9", "--seed", "7", "-n", "5", "--system", "Answer in\none word."]
    stored = _tokens(["terse", "-p", "Hi"])
    assert stored == _tokens([model, "-p", "Hi", *explicit]) and len(stored) == 5
    assert stored != _tokens([model, "-p", "Hi", *explicit[:-2]])  # the system prompt counts
    # flags given on the command line win over the stored parameters, one by one
    assert _tokens(["terse", "-p", "Hi", "-n", "3"]) == _tokens([model, "-p", "Hi", *explicit[:4], "-n", "3",
                                                                   *explicit[6:]])
    assert _tokens(["terse", "-p", "Hi", "--temp", "0", "--system", "x"]) == \
        _tokens([model, "-p", "Hi", "-n", "5", "--system", "x"])


def test_stored_typical_p_and_mirostat_are_run(store, folder, fixtures_dir):
    """Ollama's typical_p and mirostat / mirostat_tau / mirostat_eta PARAMETERs (its engine leaves
    them out; qvl runs llama.cpp's samplers): a stored model's answer is the one given them
    explicitly, from Python, qvl-run (a flag wins over the stored value) and Ollama's options."""
    from qvl.runtime.loader import load
    from qvl.runtime.sampler_chain import ChainOptions

    (folder / "Modelfile").write_text("FROM tiny-qwen2.5-vl-f16.gguf\nPARAMETER temperature 1.2\nPARAMETER seed 5\n"
                                      "PARAMETER typical_p 0.6\nPARAMETER mirostat 2\nPARAMETER mirostat_tau 2.5\n"
                                      "PARAMETER mirostat_eta 0.3\n")
    assert runner.invoke(app, ["create", "miro:1", "-f", str(folder / "Modelfile")]).exit_code == 0
    plain = load(folder / "tiny-qwen2.5-vl-f16.gguf")
    chain = ChainOptions(typical_p=0.6, mirostat=2, mirostat_tau=2.5, mirostat_eta=0.3)
    want = plain.generate("Hi", max_new_tokens=8, temperature=1.2, seed=5, chain=chain).token_ids
    assert want != plain.generate("Hi", max_new_tokens=8, temperature=1.2, seed=5).token_ids
    assert load("miro:1").generate("Hi", max_new_tokens=8).token_ids == want
    assert _tokens(["miro:1", "-p", "Hi", "-n", "8"]) == want
    assert _tokens(["miro:1", "-p", "Hi", "-n", "8", "--mirostat", "0"]) == plain.generate(
        "Hi", max_new_tokens=8, temperature=1.2, seed=5, chain=ChainOptions(typical_p=0.6)).token_ids
    from qvl.runtime.server import generation_options

    kwargs = generation_options({}, {"typical_p": 0.6, "mirostat": 2, "mirostat_tau": 2.5, "mirostat_eta": 0.3}, None)
    assert kwargs["chain"] == chain
    assert generation_options({"mirostat": 2}, {"mirostat_eta": 0.5}, None)["chain"] == ChainOptions(
        mirostat=2, mirostat_eta=0.5)  # the request's over the stored ones, one by one


def test_show_modelfile_rebuilds_the_model(store, folder):
    model = folder / "tiny-qwen2.5-vl-f16.gguf"
    r = runner.invoke(app, ["create", "base:1", str(model), "--params", '{"top_k": 20, "stop": ["<|im_end|>"]}'])
    assert r.exit_code == 0, r.stderr
    text = runner.invoke(app, ["show", "base:1", "--modelfile"]).stdout
    assert "FROM " + str(store.blob_path(store.get("base:1").manifest["layers"][0]["digest"])) in text
    (folder / "Modelfile").write_text(text)
    assert runner.invoke(app, ["create", "again:1", "-f", str(folder / "Modelfile")]).exit_code == 0
    assert store.get("again:1").manifest == store.get("base:1").manifest

    # FROM a stored model: its layers, with the Modelfile's parameters over its own
    (folder / "Modelfile").write_text("FROM base:1\nPARAMETER top_k 5\nPARAMETER temperature 0.5\n")
    r = runner.invoke(app, ["create", "child:1", "-f", str(folder / "Modelfile")])
    assert r.exit_code == 0, r.stderr
    child, base = store.get("child:1").manifest["layers"], store.get("base:1").manifest["layers"]
    assert child[:2] == base[:2]  # model and projector blobs shared, not copied
    assert store.params(store.get("child:1")) == {"top_k": 5, "stop": ["<|im_end|>"], "temperature": 0.5}


def test_rm_several(store, folder):
    model = str(folder / "tiny-qwen2.5-vl-f16.gguf")
    for name in ("a:1", "b:1"):
        assert runner.invoke(app, ["create", name, model]).exit_code == 0
    r = runner.invoke(app, ["rm", "a:1", "missing:1", "b:1"])
    assert r.exit_code == 2 and "'missing:1' not found" in r.stderr
    assert [str(e.name) for e in store.list()] == ["a:1", "b:1"]  # checked first: nothing removed
    r = runner.invoke(app, ["rm", "a:1", "b:1", "library/b:1"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("deleted") == 2 and store.list() == []
    assert list((store.root / "blobs").iterdir()) == []


@pytest.mark.parametrize("args,modelfile,expect", [
    (["x"], None, "give MODEL or -f Modelfile"),
    (["x", "{model}", "-f", "{mf}"], "FROM m.gguf", "MODEL and -f: choose one"),
    (["x", "-f", "{mf}", "--params", "{}"], "FROM m.gguf", "-f with --mmproj / --template / --params"),
    (["x", "-f", "{folder}/none"], None, "none: file not found"),
    (["x", "-f", "{mf}"], "FROM ./nothing.gguf", "FROM ./nothing.gguf: no such file, nor a stored model"),
    (["x", "-f", "{mf}"], "FROM .", "files/config.json: file not found"),  # a folder: a checkpoint's, or nothing
    (["x", "-f", "{mf}"], "FROM .\nFROM tiny-qwen2.5-vl-f16.gguf", "FROM .: a checkpoint folder is the only FROM"),
    (["x", "{folder}", "--quantize", "q3_k"], None, "type 'q3_k': choose one of"),
    (["x", "-f", "{mf}"], "FROM tiny-qwen2.5-vl-f16.gguf\nFROM tiny-qwen2.5-vl-f16.gguf", "a second text model"),
    (["x", "-f", "{mf}"], "FROM mmproj-tiny-qwen2.5-vl-f16.gguf", "FROM names only a projector"),
    (["x", "-f", "{mf}"], "FROM tiny-qwen2.5-vl-f16.gguf\nPARAMETER num_gpu 20", "PARAMETER num_gpu: qvl does not"),
    (["x", "-f", "{mf}"], "FROM tiny-qwen2.5-vl-f16.gguf\nADAPTER ./lora", "ADAPTER ./lora: "
     "{folder}/lora: no such LoRA adapter (a GGUF file or a PEFT folder)"),
    (["x", "-f", "{mf}"], "FROM .\nADAPTER ./tiny-qwen2.5-vl-f16.gguf", "ADAPTER {folder}/tiny-qwen2.5-vl-f16.gguf: "
     "with a checkpoint folder FROM, an ADAPTER is a PEFT folder (merged as it converts)"),
    (["x", "{model}", "--params", "[1]"], None, "--params [1]: a JSON object"),
    (["x", "{model}", "--params", '{"top_p": 3}'], None, "PARAMETER top_p 3.0: between 0 and 1"),
    (["../x", "-f", "{mf}"], "FROM tiny-qwen2.5-vl-f16.gguf", "invalid model name"),
])
def test_create_errors(store, folder, args, modelfile, expect):
    if modelfile is not None:
        (folder / "Modelfile").write_text(modelfile)
    subst = {"model": str(folder / "tiny-qwen2.5-vl-f16.gguf"), "mf": str(folder / "Modelfile"),
             "folder": str(folder)}
    r = runner.invoke(app, ["create", *[a.replace("{model}", subst["model"]).replace("{mf}", subst["mf"])
                                        .replace("{folder}", subst["folder"]) for a in args]])
    assert r.exit_code == 2, r.stdout
    expect = expect.replace("{folder}", subst["folder"])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("qvl: error:") and expect in r.stderr, r.stderr
    assert store.list() == []


def test_damaged_stored_params_fail_the_run_in_one_line(store, folder):
    entry = store.create("odd:1", folder / "tiny-qwen2.5-vl-f16.gguf", params={"top_p": 7, "mirostat": 1})
    r = runner.invoke(run_app, ["odd:1", "-p", "Hi", "-n", "1"])
    assert r.exit_code == 2
    assert r.stderr == "qvl-run: error: model 'odd:1': stored PARAMETER top_p 7.0: between 0 and 1 (1: off)\n"
    assert entry.layer("params") is not None


def test_create_from_a_checkpoint_folder(store, fixtures_dir, tmp_path):
    """`qvl create` from a Hugging Face checkpoint folder (MODEL, or a Modelfile's FROM, as
    `ollama create` takes a safetensors folder): converted as qvl-convert converts it (f16, or
    --quantize's type straight from the checkpoint), stored with the Modelfile's defaults, no
    temporary file left in the store."""
    from gguf_compare import differences
    from qvl.convert.cli import app as convert_app

    hf = fixtures_dir / "tiny-qwen2.5-vl" / "hf"
    (tmp_path / "Modelfile").write_text(f"FROM {hf}\nSYSTEM Be brief.\nPARAMETER temperature 0.3\n")
    r = runner.invoke(app, ["create", "hf:f16", "-f", str(tmp_path / "Modelfile")])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["create", "hf:q8", str(hf), "--quantize", "q8_0"])
    assert r.exit_code == 0, r.stderr
    for name, kind in (("hf:f16", "f16"), ("hf:q8", "q8_0")):
        want = tmp_path / f"{kind}.gguf"
        assert runner.invoke(convert_app, [str(hf), "-o", str(want), "--type", kind, "-q"]).exit_code == 0
        model, projector = store.resolve(name)
        assert differences(model, want) == [] and differences(projector, tmp_path / f"mmproj-{kind}.gguf") == []
    shown = runner.invoke(app, ["show", "hf:f16", "--modelfile"]).stdout
    assert "SYSTEM \"\"\"Be brief.\"\"\"" in shown and "PARAMETER temperature 0.3" in shown
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []
