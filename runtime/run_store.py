"""qvl-run's model given by a store name: pulled into the store when it is not there (unless
--no-pull), and its stored PARAMETERs and SYSTEM, which stand in for the flags not given."""

from __future__ import annotations

import typer

from .run_flags import fail as _fail
from .store import StoreError


def stored_run_defaults(ctx: typer.Context, name: str) -> tuple[dict[str, object], str | None]:
    """A stored model's parameters, keyed by run()'s argument, for the options not given on the
    command line (as Ollama: a request's options win over the model's), and its system prompt."""
    from .modelfile import USED, stored_defaults
    from .store import Store

    store = Store()
    try:
        store.get(name)
    except StoreError:
        return {}, None  # not a stored model: load() says what is wrong with the name
    try:
        params, system = stored_defaults(store, name)
    except StoreError as e:
        _fail(str(e))

    def unset(arg: str) -> bool:  # typer vendors click: its ParameterSource is not click's own
        source = ctx.get_parameter_source(arg)
        return source is None or source.name == "DEFAULT"

    return {USED[k][1]: v for k, v in params.items() if unset(USED[k][1])}, system


def pull_if_missing(name: str, no_pull: bool, insecure: bool) -> None:
    """A store name that is not in the store is pulled first (unless --no-pull)."""
    from .sources import pull_with_progress
    from .store import ModelName, Store

    if name.lower().endswith(".gguf") or name.startswith(("/", "./", "../", "~")):
        _fail(f"{name}: file not found")
    try:
        ModelName.parse(name)
    except StoreError:
        return  # not a name: load() reports the missing file
    store = Store()
    try:
        store.get(name)
        return
    except StoreError:
        if no_pull:
            _fail(f"model {name!r} is not in the store {store.root} (and --no-pull was given)")
    typer.echo(f"qvl-run: pulling {name}", err=True)
    try:
        pull_with_progress(name, store, insecure)
    except StoreError as e:
        _fail(str(e))
