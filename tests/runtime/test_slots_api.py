"""llama.cpp server's slot endpoints on `qvl serve` (slots_api.py): the KV cache saved, erased and
restored, the next request reading the restored prompt from it (cached_tokens) with the same
answer; bad names, slots and actions, and a server without --slot-save-path, refused."""

from __future__ import annotations

import base64
import json

import pytest
from serving import MODEL, Running, png

from qvl.runtime.server import ServeConfig, Service


@pytest.fixture(scope="module")
def slotted(store, files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slots")
    r = Running(Service(ServeConfig(default_model=str(files / MODEL), slot_save_path=str(folder)), store))
    r.folder = folder
    yield r
    r.server.shutdown()


def _ask(r):
    url = "data:image/png;base64," + base64.b64encode(png(size=(140, 112))).decode()
    return r.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour?"}]}]})


def test_save_erase_restore(slotted):
    first = _ask(slotted)
    saved = slotted.json("/slots/0?action=save", {"filename": "page.bin"})
    usage = first["usage"]
    assert saved["id_slot"] == 0 and saved["filename"] == "page.bin"
    assert saved["n_saved"] == usage["prompt_tokens"] + usage["completion_tokens"]  # the answer fed back too
    assert saved["n_written"] == (slotted.folder / "page.bin").stat().st_size > 0 and saved["timings"]["save_ms"] > 0
    assert slotted.json("/slots/0?action=erase", {}) == {"id_slot": 0, "n_erased": saved["n_saved"]}
    assert _ask(slotted)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # erased: read whole
    slotted.json("/slots/0?action=erase", {})
    restored = slotted.json("/slots/0?action=restore", {"filename": "page.bin"})
    assert restored["n_restored"] == saved["n_saved"] and restored["n_read"] == saved["n_written"]
    again = _ask(slotted)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    slots = slotted.json("/slots")
    assert len(slots) == 1 and slots[0]["id"] == 0 and slots[0]["is_processing"] is False


@pytest.mark.parametrize("path,body,status,expect", [
    ("/slots/0?action=save", {"filename": "../x.bin"}, 400, "filename: a plain file name"),
    ("/slots/0?action=save", {"filename": "a/b.bin"}, 400, "filename: a plain file name"),
    ("/slots/0?action=restore", {"filename": "none.bin"}, 400, "none.bin: no such file in --slot-save-path"),
    ("/slots/0?action=drop", {}, 400, "action: save, restore or erase"),
    ("/slots/0", {}, 400, "action: save, restore or erase"),
    ("/slots/1?action=erase", {}, 400, "slot '1': qvl serve has one slot, 0"),
])
def test_refused(slotted, path, body, status, expect):
    got, data = slotted.request(path, body)
    assert got == status and expect in json.loads(data)["error"], data


def test_a_file_of_another_model_is_refused(slotted, store, files):
    (slotted.folder / "junk.bin").write_bytes(b"not a cache")
    got, data = slotted.request("/slots/0?action=restore", {"filename": "junk.bin"})
    assert got == 400 and "junk.bin: not a prompt cache qvl can read" in json.loads(data)["error"]


def test_without_a_save_path(running):
    got, data = running.request("/slots/0?action=save", {"filename": "x.bin"})
    assert got == 501 and "--slot-save-path" in json.loads(data)["error"]


def test_the_serve_flag_wants_a_folder(tmp_path):
    from typer.testing import CliRunner

    from qvl.runtime.cli import app

    r = CliRunner().invoke(app, ["serve", "--slot-save-path", str(tmp_path / "none")])
    assert r.exit_code == 2 and f"--slot-save-path {tmp_path / 'none'}: not a folder" in r.stderr
