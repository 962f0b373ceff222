"""The one error type of the converter: a one-line message that names the file, key or tensor."""


class ConvertError(Exception):
    """Bad input or an environment problem; the CLI prints it on one line and exits with 2."""
