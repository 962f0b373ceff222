"""The error a `qvl serve` request is answered with: an HTTP status and {"error": message}."""

from __future__ import annotations


class RequestError(Exception):
    """A request answered with an HTTP error status and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message
