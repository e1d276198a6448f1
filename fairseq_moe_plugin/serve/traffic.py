"""The traffic split between a model's versions: weighted, sticky, with shadow copies.

A request that names no version gets one by its model's weights (after the circuit breakers:
``breaker.CircuitBreaker.weight_factor``). With a sticky id (the ``X-Request-ID`` header, else
the API key) the choice is reproducible: the id and the model's name are hashed (blake2b, 8
bytes) to a number ``u`` uniform in [0, 1), and the version is the first whose cumulative share
passes ``u``, so a client keeps its version for as long as the weights stay the same. Without an
id, ``u`` is random. Each shadow version gets a copy of the request with probability
``shadow_fraction``, decided by another hash of the same id (or at random).

What this adds over ``random.choices``: the reproducible, per-client choice; the shares of
versions whose breaker is open go to the others in proportion to their weights.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence


def stable_uniform(text: str) -> float:
    """``text`` hashed to a number in [0, 1) (the same on every run and every machine)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def sticky_id(request_id: str | None, api_key: str | None) -> str | None:
    """What a request sticks by: its ``X-Request-ID``, else its API key, else nothing."""
    if request_id:
        return "id:" + request_id
    if api_key:
        return "key:" + api_key
    return None


def draw(model: str, sticky: str | None, salt: str = "", rng: random.Random | None = None) -> float:
    """The request's number in [0, 1) for ``model`` (and ``salt``: one per shadow version)."""
    if sticky is None:
        return (rng or random).random()
    return stable_uniform(f"{model}\x00{salt}\x00{sticky}")


def pick(weights: Sequence[tuple[str, float]], u: float) -> str | None:
    """The name whose cumulative share of ``weights`` first passes ``u`` (None when the weights
    sum to 0: every version is out of the split)."""
    total = sum(w for _, w in weights if w > 0)
    if total <= 0:
        return None
    cumulative = 0.0
    chosen = None
    for name, w in weights:
        if w <= 0:
            continue
        cumulative += w / total
        chosen = name
        if u < cumulative:
            return name
    return chosen  # u within rounding of 1


def shares(weights: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Each name's share of the traffic (0 for all when the weights sum to 0)."""
    total = sum(w for _, w in weights if w > 0)
    return {name: (max(w, 0.0) / total if total > 0 else 0.0) for name, w in weights}


def takes_shadow_copy(model: str, shadow: str, fraction: float, sticky: str | None,
                      rng: random.Random | None = None) -> bool:  # fmt: skip
    """Whether shadow version ``shadow`` gets a copy of this request."""
    if fraction >= 1.0:
        return True
    return draw(model, sticky, salt="shadow:" + shadow, rng=rng) < fraction
