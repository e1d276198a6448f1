"""A circuit breaker per served version: failing or slow versions leave the traffic split.

States: **closed** (full weight) -> **open** when, over the last ``window`` requests (at least
``min_requests`` of them), the failure share is above ``max_error_rate`` or the p95 latency is
above ``max_p95_ms``; open: weight 0 and explicit requests refused (503), for ``cooldown_s``;
then **half-open**: ``probe_share`` of the weight, until ``probe_requests`` successes in a row
close it (a fresh window) or one failure (or a probe slower than ``max_p95_ms``) opens it again.

A failure is a model failure (the engine raised); refusals of bad input are the client's and do
not count. Latency is the request's time at the version (queue and model).

What this adds over a retry library's breaker (e.g. ``pybreaker``): the error-rate and p95
thresholds over a sliding window of requests with a minimum count, a weight factor for the
traffic split instead of a call wrapper, and an injectable clock for tests.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .registry import BreakerConfig

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Transition:
    """A change of state, for the log line and the metrics."""

    old: str
    new: str
    reason: str


def p95(values) -> float:
    """The 95th percentile (nearest rank) of ``values`` (non-empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class CircuitBreaker:
    """The breaker of one version.

    Args:
        config: the thresholds (the registry's ``breaker``).
        clock: seconds, monotonic (``time.monotonic``; a fake in tests).
    """

    def __init__(self, config: BreakerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._window: deque[tuple[bool, float]] = deque(maxlen=config.window)  # (ok, seconds)
        self._state = CLOSED
        self._opened_at = 0.0
        self._probe_successes = 0
        self.trips = 0
        self.reason = ""  # why it last opened

    # -- state -------------------------------------------------------------------------

    def _advance(self) -> Transition | None:
        """Open -> half-open once the cool-down is over (the caller holds the lock)."""
        if self._state == OPEN and self.clock() - self._opened_at >= self.config.cooldown_s:
            self._state, self._probe_successes = HALF_OPEN, 0
            return Transition(OPEN, HALF_OPEN, f"cool-down of {self.config.cooldown_s:g} s over")
        return None

    def poll(self) -> Transition | None:
        """Apply the clock (open -> half-open); the transition if one happened."""
        with self._lock:
            return self._advance()

    @property
    def state(self) -> str:
        with self._lock:
            self._advance()
            return self._state

    def weight_factor(self) -> float:
        """What the version's weight is multiplied by in the split."""
        state = self.state
        return 1.0 if state == CLOSED else self.config.probe_share if state == HALF_OPEN else 0.0

    def retry_after(self) -> float:
        """Seconds until an open breaker goes half-open (0 when not open)."""
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self.config.cooldown_s - (self.clock() - self._opened_at))

    def stats(self) -> dict:
        """The window's figures (for /healthz)."""
        with self._lock:
            window = list(self._window)
        latencies = [s for ok, s in window if ok]
        return {
            "requests": len(window),
            "error_rate": (sum(not ok for ok, _ in window) / len(window)) if window else 0.0,
            "p95_ms": p95(latencies) * 1000 if latencies else None,
        }

    # -- outcomes ----------------------------------------------------------------------

    def record(self, ok: bool, seconds: float) -> Transition | None:
        """One request's outcome at the version; the transition it caused, if any."""
        c = self.config
        slow = c.max_p95_ms is not None and seconds * 1000 > c.max_p95_ms
        with self._lock:
            self._advance()
            if self._state == OPEN:  # answered after the trip (it was queued): ignored
                return None
            if self._state == HALF_OPEN:
                if ok and not slow:
                    self._probe_successes += 1
                    if self._probe_successes >= c.probe_requests:
                        self._state = CLOSED
                        self._window.clear()
                        return Transition(HALF_OPEN, CLOSED,
                                          f"{self._probe_successes} probe requests succeeded")  # fmt: skip
                    return None
                why = "a probe request failed" if not ok else (
                    f"a probe request took {seconds * 1000:.0f} ms (max_p95_ms {c.max_p95_ms:g})"
                )  # fmt: skip
                return self._trip(HALF_OPEN, why)
            self._window.append((ok, seconds))
            if len(self._window) < c.min_requests:
                return None
            errors = sum(not o for o, _ in self._window)
            rate = errors / len(self._window)
            if rate > c.max_error_rate:
                return self._trip(CLOSED, f"error rate {rate:.2f} ({errors} of the last "
                                  f"{len(self._window)} requests) is above max_error_rate "
                                  f"{c.max_error_rate:g}")  # fmt: skip
            latencies = [s for o, s in self._window if o]
            if c.max_p95_ms is not None and len(latencies) >= c.min_requests:
                high = p95(latencies) * 1000
                if high > c.max_p95_ms:
                    return self._trip(CLOSED, f"p95 latency {high:.0f} ms over the last "
                                      f"{len(latencies)} answered requests is above max_p95_ms "
                                      f"{c.max_p95_ms:g}")  # fmt: skip
            return None

    def _trip(self, old: str, reason: str) -> Transition:
        self._state, self._opened_at, self.reason = OPEN, self.clock(), reason
        self._window.clear()
        self.trips += 1
        return Transition(old, OPEN, reason)
