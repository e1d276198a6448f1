"""The FastAPI app: routes, API-key check, metrics, JSON errors.

Routes:
- ``POST /v1/translate`` ``{"texts": [...], "target_lang": "de", "source_lang": "en", "beam": 5}``
  -> ``{"translations": [...], "source_lang", "target_lang", "beam"}`` (translation models;
  ``target_lang`` is required when the model has several, ``source_lang`` when a target has
  several sources);
- ``POST /v1/classify`` ``{"texts": ["...", ...]}`` (or ``[["a", "b"], ...]`` for a model trained
  on pairs) -> ``{"predictions": [{"label", "probabilities": {label: p}}], "labels"}``;
- ``GET /healthz`` (always open) and ``GET /metrics`` (Prometheus text; needs the key when keys
  are on).

The route of the other kind of model answers 404 saying what this server serves. Every error is
``{"error": {"kind", "message", ...}}`` with a 4xx status (a 500 only for a failure inside the
model, logged with its traceback), and is counted in ``fairseq_moe_errors_total{kind}``.

Requests are encoded on the event loop (cheap, and a bad text fails its own request only), then
awaited on the batcher (``batching.py``), whose worker thread runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import ApiKeys
from .batching import DynamicBatcher
from .engine import Engine
from .errors import ServeError
from .inputs import check_fields, optional_int, optional_str, read_json_object, texts_field
from .metrics import ServeMetrics

logger = logging.getLogger("fairseq_moe_plugin.serve")

TRANSLATE, CLASSIFY = "/v1/translate", "/v1/classify"


@dataclass
class ServeSettings:
    """The app's limits (flags of fairseq-moe-serve)."""

    max_wait_ms: float = 5.0
    max_texts: int = 64
    max_body_bytes: int = 1 << 20
    max_queue_texts: int = 4096


def create_app(engine: Engine, settings: ServeSettings, api_keys: ApiKeys | None = None):
    """The app serving ``engine``; the batcher's worker starts and stops with the app's
    lifespan (``close`` drains the queue)."""
    metrics = ServeMetrics(engine.routing.num_experts, engine.routing.fallback_expert)

    def on_batch(batch, result) -> None:
        items = batch.items
        metrics.observe_batch(engine.route, texts=len(items), requests=len(batch.jobs),
                              waited=batch.waited, seconds=batch.seconds,
                              tokens_in=sum(t.numel() for t in items),
                              tokens_out=result.tokens_out, routing=result.routing)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = DynamicBatcher(
            engine.run,
            max_wait=settings.max_wait_ms / 1000.0,
            max_batch_tokens=engine.options.max_batch_tokens,
            max_queue_items=settings.max_queue_texts,
            on_batch=on_batch,
        )
        yield
        await asyncio.to_thread(app.state.batcher.close)  # drain, then stop the worker

    app = FastAPI(title="fairseq-moe-serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.metrics = metrics
    app.state.engine = engine

    def error_response(err: ServeError) -> JSONResponse:
        metrics.error(err.kind)
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ServeError)
    async def serve_error(request, err: ServeError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        if err.status_code == 404:
            return error_response(ServeError(404, "not_found", f"no route {request.url.path}: "
                                             f"this server serves POST {engine.route}, GET "
                                             "/healthz and GET /metrics"))  # fmt: skip
        if err.status_code == 405:
            return error_response(ServeError(405, "method_not_allowed", f"{request.method} "
                                             f"{request.url.path} is not allowed"))  # fmt: skip
        return error_response(ServeError(err.status_code, "http_error", str(err.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err):
        return error_response(ServeError(422, "invalid_request", str(err.errors()[:1])))

    @app.exception_handler(Exception)
    async def internal_error(request, err):
        logger.error("internal error on %s: %r", request.url.path, err, exc_info=err)
        return error_response(ServeError(500, "internal", f"internal error: {type(err).__name__}"))

    class Guard:
        """API key (all but /healthz), then latency and in-flight metrics of the /v1 routes.
        A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) costs
        a task and a stream per request, which shows at a few hundred requests per second."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            path = scope["path"]
            if api_keys is not None and path != "/healthz":
                if not api_keys.allows(Headers(scope=scope)):
                    response = error_response(ServeError(401, "unauthorized", "missing or invalid "
                                                         "API key: send 'Authorization: Bearer "
                                                         "KEY' or 'X-API-Key: KEY'"))  # fmt: skip
                    return await response(scope, receive, send)
            if path not in (TRANSLATE, CLASSIFY):
                return await self.app(scope, receive, send)
            status = 500  # unless the app starts a response

            async def send_and_note_status(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            start = time.perf_counter()
            metrics.in_flight.inc()
            try:
                await self.app(scope, receive, send_and_note_status)
            finally:
                metrics.in_flight.dec()
                metrics.observe_request(path, status, time.perf_counter() - start)

    app.add_middleware(Guard)

    async def run(request, key, items) -> list:
        """The batch outputs of ``items``; a failure inside the model is a logged 500."""
        try:
            return await request.app.state.batcher.submit(key, items)
        except ServeError:
            raise
        except Exception as e:  # the batcher logged the traceback
            raise ServeError(500, "internal", f"the model failed: {type(e).__name__}") from e

    def not_served(route: str) -> ServeError:
        what = "a translation model" if engine.kind == "translation" else "a classifier"
        return ServeError(404, "route_not_served", f"{route} is not served here: this server "
                          f"serves {what} at POST {engine.route}", serves=engine.route)  # fmt: skip

    @app.get("/healthz")
    async def healthz(request: Request):
        return {"status": "ok", **engine.describe(),
                "queue_texts": request.app.state.batcher.queued_items}  # fmt: skip

    @app.get("/metrics")
    async def metrics_route(request: Request):
        metrics.queue.set(request.app.state.batcher.queued_items)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post(TRANSLATE)
    async def translate(request: Request):
        if engine.kind != "translation":
            raise not_served(TRANSLATE)
        body = await read_json_object(request, settings.max_body_bytes)
        check_fields(body, TRANSLATE, ("texts", "target_lang", "source_lang", "beam"))
        texts = texts_field(body, settings.max_texts)
        target_lang, source_lang = (
            optional_str(body, "target_lang"),
            optional_str(body, "source_lang"),
        )
        beam = engine.check_beam(optional_int(body, "beam"))
        source_lang, target_lang = engine.resolve_languages(target_lang, source_lang)
        items = [engine.encode(t, f"texts[{i}]", source_lang, target_lang)
                 for i, t in enumerate(texts)]  # fmt: skip
        outputs = await run(request, (source_lang, target_lang, beam), items)
        return JSONResponse({"translations": outputs, "source_lang": source_lang,
                             "target_lang": target_lang, "beam": beam})  # fmt: skip

    @app.post(CLASSIFY)
    async def classify(request: Request):
        if engine.kind != "classification":
            raise not_served(CLASSIFY)
        body = await read_json_object(request, settings.max_body_bytes)
        check_fields(body, CLASSIFY, ("texts",))
        texts = texts_field(body, settings.max_texts, pairs=True)
        items = [engine.encode(t, f"texts[{i}]") for i, t in enumerate(texts)]
        outputs = await run(request, "classify", items)
        return JSONResponse({"predictions": outputs, "labels": engine.labels})

    return app
