"""One served version: its engine, its batcher, its circuit breaker, what it cost in memory,
and the requests holding it.

``load_version`` loads a ``registry.VersionSpec`` (the command line's ``EngineOptions`` with
the version's own files) and measures it: the process's resident set (``/proc/self/statm``)
before and after the load, after a ``gc.collect()``, and the bytes of the model's parameters
and buffers. The RSS delta of the first version loaded also holds the modules that loading
imported; versions loaded later show their own cost.

A request ``acquire``s the version when it is routed to it and ``release``s it when answered;
a version removed by a reload drains (``drain``): it waits until no request holds it, then its
batcher runs what is queued and stops. So no request routed before a reload is lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import time

from .batching import DynamicBatcher
from .breaker import CircuitBreaker
from .registry import BreakerConfig, VersionSpec
from .settings import ServeSettings

logger = logging.getLogger("fairseq_moe_plugin.serve")
MIB = 1 << 20


def rss_bytes() -> int:
    """The process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def parameter_bytes(engine) -> int | None:
    """Bytes of the engine's model parameters and buffers (None without a torch model)."""
    model = getattr(engine, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def version_options(spec: VersionSpec, options):
    """The command line's ``EngineOptions`` with the version's own files and engine."""
    changes = {"data": spec.data, "spm_model": spec.spm_model, "key_file": spec.decrypt_key_file,
               "engine": spec.engine}  # fmt: skip
    return dataclasses.replace(options, **{k: v for k, v in changes.items() if v is not None})


def load_version(spec: VersionSpec, options, dictionaries, load=None) -> VersionRuntime:
    """Load ``spec``'s engine (``load``: ``engine.load_engine`` unless a test gives another) and
    measure its memory. Raises what the loader raises (a ValueError naming the checkpoint)."""
    if load is None:
        from .engine import load_engine as load
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    try:
        engine = load(spec.checkpoint, version_options(spec, options), dictionaries)
    except ValueError as e:  # CheckpointError: name the registry entry too
        raise ValueError(f"model {spec.model} version {spec.name}: {e}") from e
    seconds = time.perf_counter() - start
    gc.collect()
    params = parameter_bytes(engine)
    memory = {
        "rss_delta_mib": round((rss_bytes() - before) / MIB, 1),
        "parameter_mib": round(params / MIB, 1) if params is not None else None,
        "load_seconds": round(seconds, 2),
    }
    sharing = getattr(engine, "dictionary_sharing", None)
    if sharing:
        memory["dictionaries"] = sharing["dictionaries"]
        memory["dictionaries_shared"] = sharing["shared"]
        memory["dictionary_mib_saved"] = round(sharing["saved_bytes"] / MIB, 2)
    logger.info("model %s version %s: loaded %s in %.1f s (RSS %+.1f MiB, parameters %s MiB)",
                spec.model, spec.name, spec.checkpoint, seconds, memory["rss_delta_mib"],
                memory["parameter_mib"])  # fmt: skip
    return VersionRuntime(spec, engine, memory)


class VersionRuntime:
    """A loaded version. ``start`` creates its batcher (the worker thread), so a version loaded
    for a reload that is refused costs no thread."""

    def __init__(self, spec: VersionSpec, engine, memory: dict):
        self.spec = spec
        self.engine = engine
        self.memory = memory
        self.identity = spec.identity()
        self.breaker: CircuitBreaker | None = None
        self.batcher: DynamicBatcher | None = None
        self.holders = 0  # requests (and shadow copies) routed here and not answered yet
        self.draining = False

    @property
    def label(self) -> tuple[str, str]:
        return self.spec.model, self.spec.name

    def set_breaker(self, config: BreakerConfig, clock=time.monotonic) -> None:
        """A fresh breaker when there is none or its thresholds changed."""
        if self.breaker is None or self.breaker.config != config:
            self.breaker = CircuitBreaker(config, clock)

    def start(self, settings: ServeSettings, on_batch) -> None:
        self.batcher = DynamicBatcher(
            lambda key, items: self.engine.run(key, items),  # looked up per batch
            max_wait=settings.max_wait_ms / 1000.0,
            max_batch_tokens=self.engine.options.max_batch_tokens,
            max_queue_items=settings.max_queue_texts,
            on_batch=lambda batch, result: on_batch(self, batch, result),
        )

    def acquire(self) -> VersionRuntime:
        self.holders += 1
        return self

    def release(self) -> None:
        self.holders -= 1

    async def drain(self, poll: float = 0.01) -> None:
        """Wait until no request holds the version, then run its queue and stop its worker."""
        self.draining = True
        while self.holders > 0:
            await asyncio.sleep(poll)
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)
        logger.info("model %s version %s: drained and stopped", *self.label)

    def describe(self) -> dict:
        """What /healthz says about the version."""
        spec = self.spec
        out = {
            "weight": spec.weight,
            "shadow": spec.shadow,
            "engine": spec.engine or getattr(self.engine.options, "engine", "torch"),
            "checkpoint": spec.checkpoint,
            "kind": self.engine.kind,
            "memory": self.memory,
            "queue_texts": self.batcher.queued_items if self.batcher is not None else 0,
        }
        if spec.shadow:
            out["shadow_fraction"] = spec.shadow_fraction
        if self.breaker is not None:
            out["breaker"] = {"state": self.breaker.state, "trips": self.breaker.trips,
                              "reason": self.breaker.reason, **self.breaker.stats()}  # fmt: skip
        return out
