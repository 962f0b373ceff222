"""What the grammar tests ask of a Grammar: the state after a text, and whether it takes the text whole."""

from __future__ import annotations


def state_after(grammar, text: str):
    """The parse state after `text`'s bytes (None: refused on the way)."""
    return grammar.advance(grammar.initial, text.encode())


def takes(grammar, text: str) -> bool:
    """`text` is a whole answer of `grammar`."""
    state = state_after(grammar, text)
    return state is not None and grammar.complete(state)
