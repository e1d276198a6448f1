"""The server's Prometheus metrics (prometheus-client), in a registry of their own per app.

Every series of a request, a batch or the routing carries the ``model`` and ``version`` that
answered (the single-checkpoint command line serves model ``default``, version ``v1``); a
request refused before a version was chosen (no key, bad JSON, unknown model) has
``model=""``, ``version=""``.

Requests (labels: ``route``, ``model``, ``version``; ``status``):
- ``fairseq_moe_request_latency_seconds`` (histogram; route, model, version): request to
  response, of the requests answered 2xx (refusals take microseconds and would hide the
  model's latency);
- ``fairseq_moe_requests_total`` (route, model, version, status);
  ``fairseq_moe_requests_in_flight`` (gauge);
- ``fairseq_moe_errors_total`` (kind, model, version): refused or failed requests by error kind
  (``ServeError`` kinds, e.g. ``text_too_long``, ``unauthorized``, ``internal``,
  ``unknown_model``, ``version_unavailable``).

Traffic split (labels: ``model``, ``version``):
- ``fairseq_moe_version_requests_total`` (model, version, ``how``): requests sent to a version,
  ``how`` = ``split`` (the weights chose it), ``explicit`` (the request named it) or ``shadow``
  (a copy);
- ``fairseq_moe_version_weight`` (gauge): the registry's weight (0 for a shadow version);
  ``fairseq_moe_version_share`` (gauge): its share of the split now, after the breakers;
- ``fairseq_moe_shadow_requests_total`` (model, version, ``outcome``): shadow copies answered
  the same as the primary (``agree``), otherwise (``differ``), or failed (``error``);
- ``fairseq_moe_breaker_open`` (gauge): 1 while the version's circuit breaker is open, 0.5
  half-open, 0 closed; ``fairseq_moe_breaker_trips_total``: times it opened;
- ``fairseq_moe_reloads_total`` (``outcome`` = ``ok`` | ``refused``): registry reloads.

Batches (labels: ``route``, ``model``, ``version``):
- ``fairseq_moe_batch_size_texts`` / ``fairseq_moe_batch_size_requests`` (histograms): texts
  and requests per model batch (batching off: one request per batch);
- ``fairseq_moe_batch_wait_seconds`` (histogram): first request's arrival to the batch's start;
- ``fairseq_moe_batch_compute_seconds`` (histogram): the model's time per batch;
- ``fairseq_moe_tokens_in_total``, ``fairseq_moe_tokens_out_total``: tokens fed to the model
  (with its special tokens) and tokens generated (translation);
- ``fairseq_moe_queue_texts`` (gauge; model, version): texts waiting for the version's worker.

Routing, from live traffic (labels: ``model``, ``version``, ``layer``, the MoE layer's name;
``expert``):
- ``fairseq_moe_expert_tokens_total`` (layer, expert): assignments each expert computed;
- ``fairseq_moe_routed_tokens_total`` (layer): tokens routed (decoder: every beam and step);
- ``fairseq_moe_routing_entropy_nats_total`` (layer): summed per-token router entropy; the mean
  entropy is ``rate(..._entropy_nats_total) / rate(..._routed_tokens_total)``;
- ``fairseq_moe_routing_entropy_mean_nats`` (gauge, layer): the last batch's mean;
- ``fairseq_moe_fallback_tokens_total`` (layer): tokens whose router logits were not finite and
  went to the fallback expert; share = ``fallback_tokens_total / routed_tokens_total``;
- ``fairseq_moe_fallback_share`` (gauge, layer): that share since start-up; fallbacks are also
  logged (a warning per version and layer at most every 10 s, with the tokens since the last
  one).

A dense checkpoint (no MoE layer) has no routing series. The gauges of a version removed by a
reload are removed with it; its counters stay (Prometheus counters may stop).
"""

from __future__ import annotations

import logging
import math
import threading
import time

from .routing import LayerRouting

logger = logging.getLogger("fairseq_moe_plugin.serve")

LATENCY_BUCKETS = (.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60)  # fmt: skip
FALLBACK_LOG_SECONDS = 10.0  # at most one fallback warning per layer in this time
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


MV = ["model", "version"]
BREAKER_GAUGE = {"closed": 0.0, "half_open": 0.5, "open": 1.0}


class ServeMetrics:
    """The metrics of one app (``registry``), and what updates them. A version's series exist
    from when it is added (``add_version``) and its gauges go with ``remove_version``."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        p = "fairseq_moe_"
        rmv = ["route", *MV]
        self.latency = Histogram(p + "request_latency_seconds", "Latency of answered requests (s)",
                                 rmv, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.requests = Counter(p + "requests", "Requests answered", [*rmv, "status"], registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "Requests being answered", registry=r)
        self.errors = Counter(p + "errors", "Refused or failed requests", ["kind", *MV],
                              registry=r)  # fmt: skip
        self.version_requests = Counter(p + "version_requests", "Requests sent to a version",
                                        [*MV, "how"], registry=r)  # fmt: skip
        self.weight = Gauge(p + "version_weight", "The registry's weight", MV, registry=r)
        self.share = Gauge(p + "version_share", "Share of the split now", MV, registry=r)
        self.shadow = Counter(p + "shadow_requests", "Shadow copies by outcome",
                              [*MV, "outcome"], registry=r)  # fmt: skip
        self.breaker_open = Gauge(p + "breaker_open", "1 open, 0.5 half-open, 0 closed", MV,
                                  registry=r)  # fmt: skip
        self.breaker_trips = Counter(p + "breaker_trips", "Times the breaker opened", MV,
                                     registry=r)  # fmt: skip
        self.reloads = Counter(p + "reloads", "Registry reloads", ["outcome"], registry=r)
        self.batch_texts = Histogram(p + "batch_size_texts", "Texts per model batch", rmv,
                                     buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_requests = Histogram(p + "batch_size_requests", "Requests per model batch",
                                        rmv, buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_wait = Histogram(p + "batch_wait_seconds", "First arrival to batch start",
                                    rmv, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_compute = Histogram(p + "batch_compute_seconds", "Model time per batch",
                                       rmv, buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens_in = Counter(p + "tokens_in", "Tokens fed to the model", rmv, registry=r)
        self.tokens_out = Counter(p + "tokens_out", "Tokens generated", rmv, registry=r)
        self.queue = Gauge(p + "queue_texts", "Texts waiting for the model", MV, registry=r)
        lmv = [*MV, "layer"]
        self.expert_tokens = Counter(p + "expert_tokens", "Assignments each expert computed",
                                     [*lmv, "expert"], registry=r)  # fmt: skip
        self.routed = Counter(p + "routed_tokens", "Tokens routed", lmv, registry=r)
        self.entropy_sum = Counter(p + "routing_entropy_nats", "Summed per-token router entropy",
                                   lmv, registry=r)  # fmt: skip
        self.entropy = Gauge(p + "routing_entropy_mean_nats", "Last batch's mean router entropy",
                             lmv, registry=r)  # fmt: skip
        self.fallback = Counter(p + "fallback_tokens", "Tokens sent to the fallback expert",
                                lmv, registry=r)  # fmt: skip
        self.fallback_share = Gauge(p + "fallback_share", "Fallback tokens / routed tokens",
                                    lmv, registry=r)  # fmt: skip
        self._gauges = (self.weight, self.share, self.breaker_open, self.queue)
        self._fallback_expert: dict[tuple, int] = {}  # (model, version, layer) -> its expert
        self._totals: dict[tuple, list[int]] = {}  # (model, version, layer) -> [fallback, routed]
        self._lock = threading.Lock()
        self._fallback_logged: dict[tuple, float] = {}  # key -> when it was last logged
        self._fallback_unlogged: dict[tuple, list[int]] = {}  # key -> [fallback, routed, batches]
        self._layer_gauges: dict[tuple, list[str]] = {}  # (model, version) -> its layers

    def add_version(self, model: str, version: str, num_experts: dict[str, int],
                    fallback_expert: dict[str, int], weight: float) -> None:  # fmt: skip
        """Create a version's series (every expert's from the start) and set its weight."""
        mv = {"model": model, "version": version}
        self.weight.labels(**mv).set(weight)
        self.breaker_open.labels(**mv).set(0)
        self.breaker_trips.labels(**mv)
        self.queue.labels(**mv).set(0)
        self._layer_gauges[(model, version)] = list(num_experts)
        for layer, experts in num_experts.items():
            self._fallback_expert[(model, version, layer)] = fallback_expert.get(layer, -1)
            for series in (self.routed, self.entropy_sum, self.entropy, self.fallback,
                           self.fallback_share):  # fmt: skip
                series.labels(layer=layer, **mv)
            for e in range(experts):
                self.expert_tokens.labels(layer=layer, expert=str(e), **mv)

    def remove_version(self, model: str, version: str) -> None:
        """Remove a removed version's gauges (its counters stay)."""
        for gauge in self._gauges:
            try:
                gauge.remove(model, version)
            except KeyError:
                pass
        for layer in self._layer_gauges.pop((model, version), []):
            for gauge in (self.entropy, self.fallback_share):
                try:
                    gauge.remove(model, version, layer)
                except KeyError:
                    pass

    def observe_batch(self, route: str, model: str, version: str, texts: int, requests: int,
                      waited: float, seconds: float, tokens_in: int, tokens_out: int,
                      routing: list[LayerRouting]) -> None:  # fmt: skip
        """One model batch (called on the version's worker thread)."""
        labels = {"route": route, "model": model, "version": version}
        self.batch_texts.labels(**labels).observe(texts)
        self.batch_requests.labels(**labels).observe(requests)
        self.batch_wait.labels(**labels).observe(waited)
        self.batch_compute.labels(**labels).observe(seconds)
        self.tokens_in.labels(**labels).inc(tokens_in)
        self.tokens_out.labels(**labels).inc(tokens_out)
        for layer in routing:
            self.observe_routing(model, version, layer)

    def observe_routing(self, model: str, version: str, r: LayerRouting) -> None:
        labels = {"model": model, "version": version, "layer": r.layer}
        for expert, count in enumerate(r.expert_tokens):
            if count:
                self.expert_tokens.labels(expert=str(expert), **labels).inc(count)
        self.routed.labels(**labels).inc(r.routed_tokens)
        self.entropy_sum.labels(**labels).inc(r.entropy_sum)
        if r.routed_tokens:
            self.entropy.labels(**labels).set(r.entropy_sum / r.routed_tokens)
        key = (model, version, r.layer)
        with self._lock:
            totals = self._totals.setdefault(key, [0, 0])
            totals[0] += r.fallback_tokens
            totals[1] += r.routed_tokens
            share = totals[0] / totals[1] if totals[1] else 0.0
        self.fallback.labels(**labels).inc(r.fallback_tokens)
        self.fallback_share.labels(**labels).set(share)
        if r.fallback_tokens:
            self._log_fallback(key, r)

    def _log_fallback(self, key: tuple, r: LayerRouting) -> None:
        """A warning per version and layer at most every ``FALLBACK_LOG_SECONDS``, with the
        tokens since the last one (a broken router would otherwise log every batch)."""
        with self._lock:
            pending = self._fallback_unlogged.setdefault(key, [0, 0, 0])
            pending[0] += r.fallback_tokens
            pending[1] += r.routed_tokens
            pending[2] += 1
            now = time.monotonic()
            if now - self._fallback_logged.get(key, -math.inf) < FALLBACK_LOG_SECONDS:
                return
            self._fallback_logged[key] = now
            fallback, routed, batches = self._fallback_unlogged.pop(key)
        logger.warning(
            "router fallback: model %s version %s layer %s sent %d of %d tokens (%d batch%s) to "
            "expert %s: their router logits were not finite",
            key[0],
            key[1],
            r.layer,
            fallback,
            routed,
            batches,
            "" if batches == 1 else "es",
            self._fallback_expert.get(key, "?"),
        )

    def observe_request(self, route: str, model: str, version: str, status: int,
                        seconds: float) -> None:  # fmt: skip
        labels = {"route": route, "model": model, "version": version}
        if 200 <= status < 300:
            self.latency.labels(**labels).observe(seconds)
        self.requests.labels(status=str(status), **labels).inc()

    def error(self, kind: str, model: str = "", version: str = "") -> None:
        self.errors.labels(kind=kind, model=model, version=version).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
