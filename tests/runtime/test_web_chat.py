"""The chat page a browser gets at qvl serve's / (runtime/web_chat.html): served to browsers only
(clients still read "qvl is running"), public under --api-key; its script run in node against the
running server, through a stand-in for the page's elements: the models listed, a question with a
picture streamed into the page as the server's own non-streamed answer, a conversation's second
turn, an error shown."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from serving import png

from qvl.runtime import http_serve

PAGE = Path(http_serve.__file__).with_name("web_chat.html")
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def _get(running, path, headers, method="GET"):
    import urllib.request

    req = urllib.request.Request(running.url + path, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, dict(r.headers), r.read()


def test_browsers_get_the_page_clients_the_probe(running):
    status, headers, body = _get(running, "/", BROWSER)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == PAGE.read_bytes() and headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert _get(running, "/", {})[2] == b"qvl is running"  # Ollama's clients' probe, unchanged
    assert _get(running, "/", {"Accept": "*/*"})[2] == b"qvl is running"
    status, _, body = _get(running, "/", BROWSER, "HEAD")
    assert status == 200 and body == b""


def _script() -> str:
    return re.search(r"<script>\n(.*)</script>", PAGE.read_text(), re.S).group(1)


HARNESS = r"""
const { QVL, start } = require(process.argv[2]);
const base = process.argv[3], picture = process.argv[4], asked = JSON.parse(process.argv[5]);
const elements = {}, requested = new Set();
function element(tag) {
  const listeners = {};
  const el = { tag, children: [], className: "", value: "", src: "", selected: false, scrollTop: 0, scrollHeight: 0,
    classList: { add() {}, remove() {} }, files: [],
    set textContent(v) { this._text = String(v); this.said = [...(this.said || []), this._text];
                         if (v === "") this.children = []; },
    get textContent() { return this._text !== undefined && !this.children.length ? this._text
                              : (this._text || "") + this.children.map((c) => c.textContent).join(""); },
    appendChild(c) { this.children.push(c); return c; },
    addEventListener(kind, f) { (listeners[kind] = listeners[kind] || []).push(f); },
    fire(kind, event) { for (const f of listeners[kind] || []) f({ preventDefault() {}, ...event }); },
    focus() {}, click() {} };
  return el;
}
const doc = {
  body: element("body"),
  getElementById(id) { requested.add(id); return elements[id] = elements[id] || element(id); },
  createElement: element,
  createTextNode(t) { return { textContent: t }; },
};
const store = {};
const win = {
  fetch: (path, init) => fetch(base + path, init), localStorage: { getItem: (k) => store[k] || null,
  setItem: (k, v) => { store[k] = v; } }, prompt: () => null, AbortController, TextDecoder,
  FileReader: class { readAsDataURL(f) { this.result = f.url; setTimeout(() => this.onload(), 0); } },
};
const settle = () => new Promise((done) => {
  const wait = () => elements.send.textContent === "Stop" || !elements.send._asked ? setTimeout(wait, 20) : done();
  setTimeout(wait, 20);
});
(async () => {
  start(doc, win);
  for (let t = 0; t < 500 && !elements.model.children.length && !elements.status.textContent; t++) {
    await new Promise((r) => setTimeout(r, 20));  // the models listed
  }
  elements.model.value = asked.model;
  const out = { options: elements.model.children.map((o) => o.value), answers: [] };
  for (const [i, q] of asked.questions.entries()) {
    if (i === 0) {
      elements.files.files = [{ type: "image/png", url: picture }, { type: "text/plain", url: "data:," }];
      elements.files.fire("change");
      await new Promise((r) => setTimeout(r, 50));
      out.pending = elements.pending.children.length;
    }
    elements.text.value = q;
    elements.send._asked = true;
    elements.form.fire("submit");
    await settle();
    elements.send._asked = false;
    const shown = elements.log.children.filter((c) => c.className.startsWith("msg "));
    out.answers.push({ text: shown[shown.length - 1].textContent, kind: shown[shown.length - 1].className });
  }
  out.status = elements.status.textContent;
  out.statuses = elements.status.said;
  out.requested = [...requested];
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.fixture(scope="module")
def node_page(tmp_path_factory):
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the page's script cannot run here")
    folder = tmp_path_factory.mktemp("page")
    (folder / "page.js").write_text(_script())
    (folder / "harness.js").write_text(HARNESS)
    return folder


def _run_page(node_page, running, asked) -> dict:
    picture = "data:image/png;base64," + base64.b64encode(png()).decode()
    done = subprocess.run(["node", str(node_page / "harness.js"), str(node_page / "page.js"), running.url, picture,
                           json.dumps(asked)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_page_asks_the_server_as_a_browser_would(node_page, running):
    """The page's own script: the stored models in its list (the one qvl serve was started with
    first), a picture attached (a text file is not), its question streamed into the page as the
    server answers it unstreamed (its reading shown as it goes), a second turn with the first in its
    conversation."""
    asked = {"model": "terse:1", "questions": ["What colour is it?", "And now?"]}
    out = _run_page(node_page, running, asked)
    assert out["pending"] == 1 and "tiny:1" in out["options"] and "terse:1" in out["options"], out
    assert out["options"][0] == running.json("/props")["model_alias"]  # the model qvl serve was started with
    picture = "data:image/png;base64," + base64.b64encode(png()).decode()
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                          {"type": "text", "text": "What colour is it?"}]}]
    want = running.json("/v1/chat/completions", {"model": "terse:1", "messages": first})["choices"][0]
    assert out["answers"][0] == {"text": want["message"]["content"], "kind": "msg assistant"}
    second = first + [{"role": "assistant", "content": want["message"]["content"]},
                      {"role": "user", "content": "And now?"}]
    want2 = running.json("/v1/chat/completions", {"model": "terse:1", "messages": second})["choices"][0]
    assert out["answers"][1]["text"] == want2["message"]["content"]
    assert out["status"].startswith("3 tokens")  # terse:1 is stored with num_predict 3
    # while the prompt was read: llama-server's prompt_progress, shown as the page gets it
    reading = [s for s in out["statuses"] if s.startswith("reading the prompt: ")]
    assert reading and reading[-1].split(": ")[1].split(" of ")[0] == reading[-1].split(" of ")[1].split(" ")[0]
    ids = set(re.findall(r'id="([a-z]+)"', PAGE.read_text()))
    assert set(out["requested"]) <= ids, set(out["requested"]) - ids  # every element the script uses is there


def test_the_page_shows_an_error(node_page, running):
    out = _run_page(node_page, running, {"model": "nope:1", "questions": ["Hi"]})
    assert out["answers"][0]["kind"] == "msg error" and "nope:1" in out["answers"][0]["text"]
