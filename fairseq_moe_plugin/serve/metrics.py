"""The server's Prometheus metrics (prometheus-client), in a registry of their own per app.

Requests (labels: ``route``; ``status``):
- ``fairseq_moe_request_latency_seconds`` (histogram; route): request to response, of the
  requests answered 2xx (refusals take microseconds and would hide the model's latency);
- ``fairseq_moe_requests_total`` (route, status); ``fairseq_moe_requests_in_flight`` (gauge);
- ``fairseq_moe_errors_total`` (kind): refused or failed requests by error kind (``ServeError``
  kinds, e.g. ``text_too_long``, ``unauthorized``, ``internal``).

Batches (label: ``route``):
- ``fairseq_moe_batch_size_texts`` / ``fairseq_moe_batch_size_requests`` (histograms): texts
  and requests per model batch (batching off: one request per batch);
- ``fairseq_moe_batch_wait_seconds`` (histogram): first request's arrival to the batch's start;
- ``fairseq_moe_batch_compute_seconds`` (histogram): the model's time per batch;
- ``fairseq_moe_tokens_in_total``, ``fairseq_moe_tokens_out_total``: tokens fed to the model
  (with its special tokens) and tokens generated (translation);
- ``fairseq_moe_queue_texts`` (gauge): texts waiting for the worker.

Routing, from live traffic (label: ``layer``, the MoE layer's name; ``expert``):
- ``fairseq_moe_expert_tokens_total`` (layer, expert): assignments each expert computed;
- ``fairseq_moe_routed_tokens_total`` (layer): tokens routed (decoder: every beam and step);
- ``fairseq_moe_routing_entropy_nats_total`` (layer): summed per-token router entropy; the mean
  entropy is ``rate(..._entropy_nats_total) / rate(..._routed_tokens_total)``;
- ``fairseq_moe_routing_entropy_mean_nats`` (gauge, layer): the last batch's mean;
- ``fairseq_moe_fallback_tokens_total`` (layer): tokens whose router logits were not finite and
  went to the fallback expert; share = ``fallback_tokens_total / routed_tokens_total``;
- ``fairseq_moe_fallback_share`` (gauge, layer): that share since start-up; fallbacks are also
  logged (a warning per layer at most every 10 s, with the tokens since the last one).

A dense checkpoint (no MoE layer) has no routing series.
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


class ServeMetrics:
    """The metrics of one app (``registry``), and what updates them.

    Args:
        num_experts: MoE layer name -> its number of experts (every series exists from start).
        fallback_expert: layer name -> its fallback expert (for the log message).
    """

    def __init__(self, num_experts: dict[str, int], fallback_expert: dict[str, int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        p = "fairseq_moe_"
        self.latency = Histogram(p + "request_latency_seconds", "Latency of answered requests (s)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.requests = Counter(
            p + "requests", "Requests answered", ["route", "status"], registry=r
        )
        self.in_flight = Gauge(p + "requests_in_flight", "Requests being answered", registry=r)
        self.errors = Counter(p + "errors", "Refused or failed requests", ["kind"], registry=r)
        self.batch_texts = Histogram(p + "batch_size_texts", "Texts per model batch", ["route"],
                                     buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_requests = Histogram(p + "batch_size_requests", "Requests per model batch",
                                        ["route"], buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_wait = Histogram(p + "batch_wait_seconds", "First arrival to batch start",
                                    ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_compute = Histogram(p + "batch_compute_seconds", "Model time per batch",
                                       ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tokens_in = Counter(p + "tokens_in", "Tokens fed to the model", ["route"], registry=r)
        self.tokens_out = Counter(p + "tokens_out", "Tokens generated", ["route"], registry=r)
        self.queue = Gauge(p + "queue_texts", "Texts waiting for the model", registry=r)
        self.expert_tokens = Counter(p + "expert_tokens", "Assignments each expert computed",
                                     ["layer", "expert"], registry=r)  # fmt: skip
        self.routed = Counter(p + "routed_tokens", "Tokens routed", ["layer"], registry=r)
        self.entropy_sum = Counter(p + "routing_entropy_nats", "Summed per-token router entropy",
                                   ["layer"], registry=r)  # fmt: skip
        self.entropy = Gauge(p + "routing_entropy_mean_nats", "Last batch's mean router entropy",
                             ["layer"], registry=r)  # fmt: skip
        self.fallback = Counter(p + "fallback_tokens", "Tokens sent to the fallback expert",
                                ["layer"], registry=r)  # fmt: skip
        self.fallback_share = Gauge(p + "fallback_share", "Fallback tokens / routed tokens",
                                    ["layer"], registry=r)  # fmt: skip
        self.fallback_expert = fallback_expert
        self._totals = {layer: [0, 0] for layer in num_experts}  # layer -> [fallback, routed]
        self._lock = threading.Lock()
        self._fallback_logged: dict[str, float] = {}  # layer -> when it was last logged
        self._fallback_unlogged: dict[str, list[int]] = {}  # layer -> [fallback, routed, batches]
        for layer, experts in num_experts.items():
            for series in (self.routed, self.entropy_sum, self.entropy, self.fallback,
                           self.fallback_share):  # fmt: skip
                series.labels(layer=layer)
            for e in range(experts):
                self.expert_tokens.labels(layer=layer, expert=str(e))

    def observe_batch(self, route: str, texts: int, requests: int, waited: float, seconds: float,
                      tokens_in: int, tokens_out: int, routing: list[LayerRouting]) -> None:  # fmt: skip
        """One model batch (called on the worker thread)."""
        self.batch_texts.labels(route=route).observe(texts)
        self.batch_requests.labels(route=route).observe(requests)
        self.batch_wait.labels(route=route).observe(waited)
        self.batch_compute.labels(route=route).observe(seconds)
        self.tokens_in.labels(route=route).inc(tokens_in)
        self.tokens_out.labels(route=route).inc(tokens_out)
        for layer in routing:
            self.observe_routing(layer)

    def observe_routing(self, r: LayerRouting) -> None:
        for expert, count in enumerate(r.expert_tokens):
            if count:
                self.expert_tokens.labels(layer=r.layer, expert=str(expert)).inc(count)
        self.routed.labels(layer=r.layer).inc(r.routed_tokens)
        self.entropy_sum.labels(layer=r.layer).inc(r.entropy_sum)
        if r.routed_tokens:
            self.entropy.labels(layer=r.layer).set(r.entropy_sum / r.routed_tokens)
        with self._lock:
            totals = self._totals.setdefault(r.layer, [0, 0])
            totals[0] += r.fallback_tokens
            totals[1] += r.routed_tokens
            share = totals[0] / totals[1] if totals[1] else 0.0
        self.fallback.labels(layer=r.layer).inc(r.fallback_tokens)
        self.fallback_share.labels(layer=r.layer).set(share)
        if r.fallback_tokens:
            self._log_fallback(r)

    def _log_fallback(self, r: LayerRouting) -> None:
        """A warning per layer at most every ``FALLBACK_LOG_SECONDS``, with the tokens since the
        last one (a broken router would otherwise log every batch)."""
        with self._lock:
            pending = self._fallback_unlogged.setdefault(r.layer, [0, 0, 0])
            pending[0] += r.fallback_tokens
            pending[1] += r.routed_tokens
            pending[2] += 1
            now = time.monotonic()
            if now - self._fallback_logged.get(r.layer, -math.inf) < FALLBACK_LOG_SECONDS:
                return
            self._fallback_logged[r.layer] = now
            fallback, routed, batches = self._fallback_unlogged.pop(r.layer)
        logger.warning(
            "router fallback: layer %s sent %d of %d tokens (%d batch%s) to expert %s: their "
            "router logits were not finite",
            r.layer,
            fallback,
            routed,
            batches,
            "" if batches == 1 else "es",
            self.fallback_expert.get(r.layer, "?"),
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        if 200 <= status < 300:
            self.latency.labels(route=route).observe(seconds)
        self.requests.labels(route=route, status=str(status)).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
