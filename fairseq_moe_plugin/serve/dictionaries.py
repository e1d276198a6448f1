"""One copy of each dictionary across the served versions.

Every loaded checkpoint builds its own task, and the task its own ``Dictionary`` objects (a
bilingual task with a joined vocabulary even builds two equal ones). ``DictionaryPool.share``
hashes each dictionary's content (its symbols, counts and special indices, blake2b) and points
every reference to an equal dictionary, in the task, its data manager and the model's modules, at
the first one it saw, so the copies can be freed. Done after loading and before the engine is
built (the engine keeps references).

What this adds: fairseq has no cache of dictionaries across tasks; this is that cache, keyed by
content rather than by file path (two data folders with the same ``dict.*.txt`` share too).
"""

from __future__ import annotations

import hashlib
import sys
import threading

from fairseq.data import Dictionary


def content_hash(d: Dictionary) -> str:
    """blake2b of a dictionary's content: type, symbols, counts, special indices."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(d).__qualname__.encode())
    for name in sorted(vars(d)):
        if name in ("symbols", "count", "indices"):
            continue
        h.update(f"\x00{name}={vars(d)[name]!r}".encode())
    h.update("\x01".join(d.symbols).encode("utf-8", "surrogatepass"))
    h.update(repr(list(d.count)).encode())
    return h.hexdigest()


def dictionary_bytes(d: Dictionary) -> int:
    """An estimate of a dictionary's memory: its lists, its index and its strings."""
    strings = sum(sys.getsizeof(s) for s in d.symbols)
    counts = sum(sys.getsizeof(c) for c in d.count)
    return (sys.getsizeof(d.symbols) + sys.getsizeof(d.count) + sys.getsizeof(d.indices)
            + strings + counts)  # fmt: skip


class DictionaryPool:
    """The dictionaries of all loaded versions, by content hash (shared by their versions)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._by_hash: dict[str, Dictionary] = {}
        self._lock = threading.Lock()

    def _canonical(self, d: Dictionary, found: dict[int, str]) -> Dictionary:
        key = content_hash(d)
        found[id(d)] = key
        with self._lock:
            return self._by_hash.setdefault(key, d)

    def share(self, task, model) -> dict:
        """Point every dictionary reference of ``task`` and ``model`` at the pool's equal one.
        Returns ``{"dictionaries": n, "shared": m, "saved_bytes": b}``: n distinct dictionary
        objects were found, m of them replaced by an equal one already held (b bytes freed)."""
        found: dict[int, str] = {}
        replaced: dict[int, int] = {}
        holders = [task, getattr(task, "data_manager", None), *model.modules()]
        for holder in holders:
            if holder is None:
                continue
            attrs = vars(holder)
            for name, value in list(attrs.items()):
                if isinstance(value, Dictionary):
                    attrs[name] = self._swap(value, found, replaced)
                elif (
                    isinstance(value, dict)
                    and value
                    and all(isinstance(v, Dictionary) for v in value.values())
                ):
                    for k, v in list(value.items()):
                        value[k] = self._swap(v, found, replaced)
        return {
            "dictionaries": len(found),
            "shared": len(replaced),
            "saved_bytes": sum(replaced.values()),
        }

    def _swap(self, d: Dictionary, found: dict, replaced: dict) -> Dictionary:
        if not self.enabled:
            found[id(d)] = ""
            return d
        canonical = self._canonical(d, found)
        if canonical is not d:
            replaced.setdefault(id(d), dictionary_bytes(d))
        return canonical

    def held(self) -> int:
        """Distinct dictionaries held."""
        with self._lock:
            return len(self._by_hash)
