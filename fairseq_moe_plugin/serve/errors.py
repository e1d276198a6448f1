"""The one error type of the server: an HTTP status, a kind (the ``errors_total`` label) and a
message for the client. The app turns it into ``{"error": {"kind": ..., "message": ...}}``."""

from __future__ import annotations


class ServeError(Exception):
    """A request the server refuses (4xx), or cannot serve now (503).

    Args:
        status: the HTTP status code.
        kind: a short snake_case name, e.g. ``text_too_long`` (label of the errors counter).
        message: what was wrong, naming the field, for the client.
        details: extra JSON fields of the error (e.g. the accepted target languages).
    """

    def __init__(self, status: int, kind: str, message: str, **details):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.details = details
        self.model = self.version = ""  # set once the request's version is known
        self.headers: dict[str, str] = {}  # extra response headers (e.g. Retry-After)

    def at(self, model: str, version: str) -> ServeError:
        """This error, labelled with the version that refused it (metrics, headers)."""
        if not self.model:
            self.model, self.version = model, version
        return self

    def body(self) -> dict:
        return {"error": {"kind": self.kind, "message": self.message, **self.details}}


def invalid(kind: str, message: str, **details) -> ServeError:
    """A 422: the JSON was read but a field is wrong."""
    return ServeError(422, kind, message, **details)
