"""Fixtures of the serve and qvl-run tests: the tiny model's files (and its GGUF's path), a
store holding it twice (one with stored defaults), the model called in Python, and a running
`qvl serve` over that store. A test module's own fixture of the same name wins."""

from __future__ import annotations

import pytest
from serving import MODEL, Running

from qvl.runtime.loader import load
from qvl.runtime.server import ServeConfig, Service
from qvl.runtime.store import Store


@pytest.fixture(scope="module")
def files(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"


@pytest.fixture(scope="module")
def tiny_gguf(files) -> str:
    """The tiny Qwen2.5-VL text GGUF's path (its mmproj beside it), as qvl-run takes it."""
    return str(files / MODEL)


@pytest.fixture(scope="module")
def store(tmp_path_factory, files):
    store = Store(tmp_path_factory.mktemp("models"))
    store.create("tiny:1", files / MODEL, files / f"mmproj-{MODEL}")
    store.create("terse:1", files / MODEL, files / f"mmproj-{MODEL}", params={"num_predict": 3, "seed": 5},
                 system="Answer in one word.")
    return store


@pytest.fixture(scope="module")
def reference(files):
    return load(files / MODEL)


@pytest.fixture(scope="module")
def running(store, files):
    r = Running(Service(ServeConfig(default_model=str(files / MODEL)), store))
    yield r
    r.server.shutdown()
