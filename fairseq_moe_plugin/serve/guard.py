"""The app's front: the API-key check, per-request metrics labelled with the version that
answered, and every error as ``{"error": {"kind", "message", ...}}`` JSON.

A response says which version answered in its ``X-Model`` and ``X-Model-Version`` headers
(errors too, once a version was chosen); the middleware reads them back from the response to
label ``requests_total`` and the latency histogram, so routes need not report to it.
"""

from __future__ import annotations

import logging
import time

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServeError

logger = logging.getLogger("fairseq_moe_plugin.serve")
MODEL_HEADER, VERSION_HEADER = "X-Model", "X-Model-Version"


def version_headers(model: str, version: str) -> dict[str, str]:
    return {MODEL_HEADER: model, VERSION_HEADER: version} if model else {}


def install_error_handlers(app, metrics, served_routes) -> callable:
    """JSON error handlers on ``app``; returns ``error_response(ServeError)``.
    ``served_routes()``: the routes this server serves (for the 404 message)."""

    def error_response(err: ServeError) -> JSONResponse:
        metrics.error(err.kind, err.model, err.version)
        headers = {**version_headers(err.model, err.version), **err.headers}
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(err.body(), status_code=err.status, headers=headers or None)

    @app.exception_handler(ServeError)
    async def serve_error(request, err: ServeError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        if err.status_code == 404:
            routes = ", ".join(f"POST {r}" for r in served_routes())
            return error_response(ServeError(404, "not_found", f"no route {request.url.path}: "
                                             f"this server serves {routes}, GET /healthz and GET "
                                             "/metrics"))  # fmt: skip
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

    return error_response


class Guard:
    """API key (all but /healthz), then latency and in-flight metrics of the ``model_routes``.
    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) costs
    a task and a stream per request, which shows at a few hundred requests per second."""

    def __init__(self, app, metrics, api_keys, error_response, model_routes: tuple[str, ...]):
        self.app = app
        self.metrics = metrics
        self.api_keys = api_keys
        self.error_response = error_response
        self.model_routes = model_routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_keys is not None and path != "/healthz":
            if not self.api_keys.allows(Headers(scope=scope)):
                response = self.error_response(ServeError(401, "unauthorized", "missing or invalid "
                                                          "API key: send 'Authorization: Bearer "
                                                          "KEY' or 'X-API-Key: KEY'"))  # fmt: skip
                return await response(scope, receive, send)
        if path not in self.model_routes:
            return await self.app(scope, receive, send)
        status, labels = 500, ["", ""]  # unless the app starts a response

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"x-model":
                        labels[0] = value.decode("latin-1")
                    elif name == b"x-model-version":
                        labels[1] = value.decode("latin-1")
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(path, *labels, status, time.perf_counter() - start)
