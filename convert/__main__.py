"""`python -m qvl.convert` is `qvl-convert`."""

from .cli import main

main()
