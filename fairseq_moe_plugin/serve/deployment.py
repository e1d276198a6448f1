"""The live set of served models and versions: routing a request to a version, and reloading
the registry without a restart.

``resolve`` picks the version of a request (the one it names, else the split of
``traffic.py`` over the versions whose breaker lets them in) and the shadow versions that get a
copy, and holds them until the request is answered. ``reload`` re-reads the registry file,
validates it completely (the file, then every new version's checkpoint loaded, then every model's
versions of one kind) while the old set keeps serving, and only then swaps the table in one step
on the event loop: unchanged versions (same ``VersionSpec.identity``) keep their engine and
batcher with their new weight; removed versions drain (``VersionRuntime.drain``).

What this adds over a dict of engines: the atomic swap after complete validation, the drain of
removed versions, and the breakers' effect on the split.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from . import traffic
from .breaker import HALF_OPEN, OPEN, Transition
from .dictionaries import DictionaryPool
from .errors import ServeError
from .metrics import BREAKER_GAUGE, ServeMetrics
from .registry import RegistrySpec, load_registry
from .settings import ServeSettings
from .versions import VersionRuntime, load_version

logger = logging.getLogger("fairseq_moe_plugin.serve")


@dataclass
class Choice:
    """The versions a request goes to: ``primary`` answers, ``shadows`` get copies."""

    primary: VersionRuntime
    how: str  # "split" or "explicit"
    shadows: list[VersionRuntime] = field(default_factory=list)

    def release(self) -> None:
        self.primary.release()


class Deployment:
    """The served registry. Built with ``start`` (loads every version) or ``from_engines``."""

    def __init__(self, spec: RegistrySpec, versions: dict[tuple[str, str], VersionRuntime],
                 metrics: ServeMetrics, settings: ServeSettings, options=None,
                 dictionaries: DictionaryPool | None = None, clock=time.monotonic, load=None):  # fmt: skip
        self.spec = spec
        self.metrics = metrics
        self.settings = settings
        self.options = options
        self.dictionaries = dictionaries or DictionaryPool(spec.share_dictionaries)
        self.clock = clock
        self.load = load
        self.versions: dict[tuple[str, str], VersionRuntime] = {}
        self._reload_lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()
        check_kinds(spec, versions)
        self._activate(spec, versions)

    @classmethod
    def start(cls, spec: RegistrySpec, options, metrics: ServeMetrics, settings: ServeSettings,
              load=None, clock=time.monotonic) -> Deployment:  # fmt: skip
        """Load every version of ``spec`` (one after another, for the memory figures)."""
        pool = DictionaryPool(spec.share_dictionaries)
        versions = {}
        for model in spec.models.values():
            for v in model.versions.values():
                versions[(model.name, v.name)] = load_version(v, options, pool, load)
        return cls(spec, versions, metrics, settings, options, pool, clock, load)

    # -- the table -----------------------------------------------------------------------

    def _activate(self, spec: RegistrySpec, versions: dict[tuple[str, str], VersionRuntime]):
        """Make ``versions`` the served table (on the event loop, or before it runs)."""
        for (model, name), rt in versions.items():
            rt.set_breaker(spec.models[model].breaker, self.clock)
            if rt.batcher is None:
                rt.start(self.settings, self._on_batch)
                routing = rt.engine.routing
                self.metrics.add_version(model, name, routing.num_experts,
                                         routing.fallback_expert, rt.spec.weight)  # fmt: skip
            self.metrics.weight.labels(model=model, version=name).set(rt.spec.weight)
        self.spec, self.versions = spec, dict(versions)

    def _on_batch(self, rt: VersionRuntime, batch, result) -> None:
        model, version = rt.label
        self.metrics.observe_batch(rt.engine.route, model, version, texts=len(batch.items),
                                   requests=len(batch.jobs), waited=batch.waited,
                                   seconds=batch.seconds,
                                   tokens_in=sum(t.numel() for t in batch.items),
                                   tokens_out=result.tokens_out, routing=result.routing)  # fmt: skip

    def model_versions(self, model: str) -> list[VersionRuntime]:
        return [rt for (m, _), rt in self.versions.items() if m == model]

    def routes(self) -> dict[str, str]:
        """model -> the route it serves."""
        return {m: self.model_versions(m)[0].engine.route for m in self.spec.models}

    # -- breakers ------------------------------------------------------------------------

    def note(self, rt: VersionRuntime, transition: Transition | None) -> None:
        """Log and count a breaker's change of state."""
        if transition is None:
            return
        model, version = rt.label
        self.metrics.breaker_open.labels(model=model, version=version).set(
            BREAKER_GAUGE[transition.new]
        )
        if transition.new == OPEN:
            self.metrics.breaker_trips.labels(model=model, version=version).inc()
            healthy = [r.spec.name for r in self.model_versions(model)
                       if not r.spec.shadow and r.breaker.state != OPEN]  # fmt: skip
            logger.warning("circuit breaker OPEN: model %s version %s leaves the split for %g s "
                           "(%s); its traffic goes to %s", model, version,
                           rt.breaker.config.cooldown_s, transition.reason,
                           ", ".join(healthy) or "no version: the model answers 503")  # fmt: skip
        elif transition.new == HALF_OPEN:
            logger.warning("circuit breaker half-open: model %s version %s gets %g of its "
                           "weight as probes (%s)", model, version,
                           rt.breaker.config.probe_share, transition.reason)  # fmt: skip
        else:
            logger.warning("circuit breaker closed: model %s version %s is back in the split "
                           "(%s)", model, version, transition.reason)  # fmt: skip

    def record(self, rt: VersionRuntime, ok: bool, seconds: float) -> None:
        self.note(rt, rt.breaker.record(ok, seconds))

    def weights(self, model: str) -> list[tuple[str, float]]:
        """The split's weights of ``model`` now (breakers applied)."""
        out = []
        for rt in self.model_versions(model):
            if rt.spec.shadow:
                continue
            self.note(rt, rt.breaker.poll())
            out.append((rt.spec.name, rt.spec.weight * rt.breaker.weight_factor()))
        return out

    def refresh_gauges(self) -> None:
        """Shares, breaker states and queues (at each /metrics scrape)."""
        for model in self.spec.models:
            shares = traffic.shares(self.weights(model))
            for rt in self.model_versions(model):
                labels = dict(zip(("model", "version"), rt.label, strict=True))
                self.metrics.share.labels(**labels).set(shares.get(rt.spec.name, 0.0))
                self.metrics.breaker_open.labels(**labels).set(BREAKER_GAUGE[rt.breaker.state])
                self.metrics.queue.labels(**labels).set(rt.batcher.queued_items)

    # -- requests ------------------------------------------------------------------------

    def model_for(self, route: str, model: str | None) -> str:
        """The model a request to ``route`` goes to; 404/422 naming the models otherwise."""
        routes = self.routes()
        if model is not None:
            if model not in routes:
                raise ServeError(404, "unknown_model", f"unknown model {model!r}: this server "
                                 f"serves {sorted(routes)}", models=sorted(routes))  # fmt: skip
            if routes[model] != route:
                raise ServeError(404, "route_not_served", f"model {model!r} is served at POST "
                                 f"{routes[model]}, not {route}", serves=routes[model])  # fmt: skip
            return model
        candidates = sorted(m for m, r in routes.items() if r == route)
        default = self.spec.default_model
        if default in candidates:
            return default
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            served = ", ".join(f"POST {r}" for r in sorted(set(routes.values())))
            raise ServeError(404, "route_not_served", f"{route} is not served here: this server "
                             f"serves {served}", serves=", ".join(sorted(set(routes.values()))))  # fmt: skip
        raise ServeError(422, "missing_model", f"model is required: {route} serves the models "
                         f"{candidates}", models=candidates)  # fmt: skip

    def resolve(self, route: str, model: str | None, version: str | None,
                sticky: str | None) -> Choice:  # fmt: skip
        """The versions of one request, held (``Choice.release`` when answered)."""
        model = self.model_for(route, model)
        versions = {rt.spec.name: rt for rt in self.model_versions(model)}
        if version is not None:
            rt = versions.get(version)
            if rt is None:
                raise ServeError(404, "unknown_version", f"model {model!r} has no version "
                                 f"{version!r}: it has {sorted(versions)}", model=model,
                                 versions=sorted(versions))  # fmt: skip
            self.note(rt, rt.breaker.poll())
            if rt.breaker.state == OPEN:
                wait = rt.breaker.retry_after()
                err = ServeError(503, "version_unavailable", f"model {model!r} version "
                                 f"{version!r} is unavailable: its circuit breaker is open "
                                 f"({rt.breaker.reason}); retry in {wait:.0f} s or name no "
                                 "version", model=model, version=version)  # fmt: skip
                err.headers["Retry-After"] = str(max(1, round(wait)))
                raise err.at(model, version)
            choice = Choice(rt.acquire(), "explicit")
        else:
            weights = self.weights(model)
            name = traffic.pick(weights, traffic.draw(model, sticky))
            if name is None:
                open_ = sorted(n for n, _ in weights)
                raise ServeError(503, "model_unavailable", f"model {model!r} is unavailable: the "
                                 f"circuit breakers of all its versions {open_} are open",
                                 model=model)  # fmt: skip
            choice = Choice(versions[name].acquire(), "split")
        for rt in versions.values():
            if (
                rt.spec.shadow
                and rt is not choice.primary
                and traffic.takes_shadow_copy(model, rt.spec.name, rt.spec.shadow_fraction, sticky)
            ):
                choice.shadows.append(rt.acquire())
        m, v = choice.primary.label
        self.metrics.version_requests.labels(model=m, version=v, how=choice.how).inc()
        for rt in choice.shadows:
            self.metrics.version_requests.labels(model=m, version=rt.spec.name, how="shadow").inc()
        return choice

    # -- reload --------------------------------------------------------------------------

    async def reload(self, path: str | None = None) -> dict:
        """Re-read the registry file and swap it in; ValueError (the old set keeps serving)
        naming what is wrong. Returns what changed."""
        path = path or self.spec.path
        if path is None:
            raise ValueError("this server serves one checkpoint (no --registry): nothing to reload")
        async with self._reload_lock:
            spec = await asyncio.to_thread(load_registry, path)
            kept, loaded, specs = {}, {}, {}
            pool = self.dictionaries
            pool.enabled = spec.share_dictionaries
            for model in spec.models.values():
                for v in model.versions.values():
                    old = self.versions.get((model.name, v.name))
                    if old is not None and old.identity == v.identity():
                        kept[(model.name, v.name)], specs[(model.name, v.name)] = old, v
                    else:
                        loaded[(model.name, v.name)] = await asyncio.to_thread(
                            load_version, v, self.options, pool, self.load
                        )
            new = {**kept, **loaded}
            check_kinds(spec, new)
            # valid: from here to the swap nothing awaits, so no request sees half of it
            for key, v in specs.items():
                kept[key].spec = v  # its weight, shadow share may have changed
            removed = [rt for key, rt in self.versions.items() if key not in new]
            replaced = [self.versions[key] for key in loaded if key in self.versions]
            self._activate(spec, new)
            for rt in removed + replaced:
                task = asyncio.create_task(self._retire(rt, gone=rt in removed))
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
        report = {"added": _names(loaded), "kept": _names(kept),
                  "removed": _names({rt.label: rt for rt in removed}),
                  "replaced": _names({rt.label: rt for rt in replaced})}  # fmt: skip
        logger.info("registry %s reloaded: added %s, kept %s, removed %s", path,
                    report["added"] or "none", report["kept"] or "none",
                    report["removed"] or "none")  # fmt: skip
        return report

    async def _retire(self, rt: VersionRuntime, gone: bool) -> None:
        await rt.drain()
        if gone:
            self.metrics.remove_version(*rt.label)

    async def close(self) -> None:
        """Drain every version (server shutdown)."""
        await asyncio.gather(*self._draining, return_exceptions=True)
        await asyncio.gather(*(rt.drain() for rt in self.versions.values()))

    def describe(self) -> dict:
        """The models and versions, for /healthz."""
        models = {}
        for name in self.spec.models:
            shares = traffic.shares(self.weights(name))
            versions = {}
            for rt in self.model_versions(name):
                versions[rt.spec.name] = {**rt.describe(), "share": shares.get(rt.spec.name, 0.0)}
            models[name] = {"route": self.routes()[name], "versions": versions}
        return {"models": models, "default_model": self.spec.default_model,
                "registry": self.spec.path}  # fmt: skip


def _names(versions: dict) -> list[str]:
    return [f"{m}/{v}" for m, v in versions]


def check_kinds(spec: RegistrySpec, versions: dict[tuple[str, str], VersionRuntime]) -> None:
    """ValueError when a model's versions are of different kinds (translation, classifier)."""
    for model in spec.models:
        kinds = {rt.engine.kind: n for (m, n), rt in versions.items() if m == model}
        if len(kinds) > 1:
            where = f"registry {spec.path}: models.{model}" if spec.path else f"model {model}"
            raise ValueError(f"{where}: its versions are of different kinds "
                             f"({', '.join(f'{n}: {k}' for k, n in kinds.items())}): one model "
                             "serves one route")  # fmt: skip
