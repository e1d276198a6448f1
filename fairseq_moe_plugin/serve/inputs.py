"""Reading and checking request bodies: every bad input becomes a ``ServeError`` (4xx) that
names the field, never a 500.

The body is read here rather than by FastAPI's pydantic binding, so that each failure has its own
status and kind: wrong content type (415), body too large (413), not UTF-8 (400, with the byte
offset), not JSON (400, with line and column), then field by field (422).
"""

from __future__ import annotations

import json

from .errors import ServeError, invalid

JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
              int: "a number", float: "a number", type(None): "null"}  # fmt: skip


def json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


async def read_json_object(request, max_bytes: int) -> dict:
    """The request's body as a JSON object."""
    content_type = request.headers.get("content-type", "")
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    if media != "application/json":
        raise ServeError(
            415,
            "unsupported_media_type",
            f"the body must be JSON sent as Content-Type: application/json, got "
            f"{content_type or 'no Content-Type'!r}",
        )
    charset = next(
        (p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), None
    )
    if charset not in (None, "utf-8", "utf8"):
        raise ServeError(
            415, "unsupported_media_type", f"the body must be UTF-8, got charset={charset}"
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ServeError(
            413, "body_too_large", f"the body has {declared} bytes; at most {max_bytes} are taken"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ServeError(
                413, "body_too_large", f"the body has more than {max_bytes} bytes (the limit)"
            )
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ServeError(
            400,
            "invalid_encoding",
            f"the body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset {e.start}",
        ) from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ServeError(
            400, "invalid_json", f"the body is not valid JSON: {e.msg} at line {e.lineno} "
            f"column {e.colno}"
        ) from e  # fmt: skip
    except RecursionError as e:
        raise ServeError(400, "invalid_json", "the body's JSON is nested too deeply") from e
    if not isinstance(value, dict):
        raise invalid("wrong_type", f"the body must be a JSON object, got {json_type(value)}")
    return value


def check_fields(body: dict, route: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise invalid(
            "unknown_field", f"unknown field(s) {unknown}: {route} takes {', '.join(allowed)}"
        )


def texts_field(body: dict, max_texts: int, pairs: bool = False) -> list:
    """``body["texts"]``: a non-empty list of at most ``max_texts`` strings (or, with
    ``pairs``, items that are strings or ``[text_a, text_b]``)."""
    if "texts" not in body:
        raise invalid("missing_field", "the body has no 'texts' (a list of strings)")
    texts = body["texts"]
    if not isinstance(texts, list):
        raise invalid("wrong_type", f"texts must be a list of strings, got {json_type(texts)}")
    if not texts:
        raise invalid("empty_texts", "texts is empty: send at least one text")
    if len(texts) > max_texts:
        raise invalid(
            "too_many_texts",
            f"texts has {len(texts)} items; this server takes at most {max_texts} per request "
            "(--max-texts)",
        )
    for i, text in enumerate(texts):
        if isinstance(text, str):
            continue
        if pairs and isinstance(text, list):
            if len(text) == 2 and all(isinstance(t, str) for t in text):
                continue
            raise invalid("wrong_type", f"texts[{i}] must be a pair [text_a, text_b] of strings")
        expected = "a string or a pair [text_a, text_b]" if pairs else "a string"
        raise invalid("wrong_type", f"texts[{i}] must be {expected}, got {json_type(text)}")
    return texts


def optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid("wrong_type", f"{name} must be a string, got {json_type(value)}")
    return value


def optional_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise invalid("wrong_type", f"{name} must be an integer, got {json_type(value)}")
    return value
