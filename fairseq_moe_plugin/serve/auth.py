"""API keys: ``--api-key-file`` (one key per line) and the request headers that carry one.

A request carries its key as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. Keys are
compared in constant time (``hmac.compare_digest``) against every key of the file.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping


def read_api_keys(path: str | os.PathLike) -> tuple[str, ...]:
    """The keys of ``path``: one per line, surrounding spaces removed; blank lines and lines
    starting with ``#`` are skipped. ValueError naming the file when it is missing, unreadable,
    or holds no key (an empty file would silently lock everyone out)."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise ValueError(f"--api-key-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it: {e}") from e
    keys = tuple(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not keys:
        raise ValueError(f"--api-key-file {path} holds no key (one key per line; # comments)")
    bad = [n for n, key in enumerate(keys) if any(c.isspace() for c in key)]
    if bad:
        raise ValueError(f"--api-key-file {path}: key {bad[0] + 1} contains whitespace")
    return keys


class ApiKeys:
    """The accepted keys; ``allows(headers)`` says whether a request carries one of them."""

    def __init__(self, keys: tuple[str, ...]):
        self._keys = tuple(key.encode("utf-8") for key in keys)

    @staticmethod
    def presented(headers: Mapping[str, str]) -> str | None:
        """The key a request carries (``Authorization: Bearer`` first), or None."""
        auth = headers.get("authorization")
        if auth:
            scheme, _, value = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        key = headers.get("x-api-key")
        return key.strip() if key and key.strip() else None

    def allows(self, headers: Mapping[str, str]) -> bool:
        key = self.presented(headers)
        if key is None:
            return False
        given = key.encode("utf-8")
        # every key compared, so the time does not depend on which one matched
        return sum(hmac.compare_digest(given, k) for k in self._keys) > 0
