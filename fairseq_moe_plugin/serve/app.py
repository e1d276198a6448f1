"""The FastAPI app: routes over the deployment's models and versions.

Routes:
- ``POST /v1/translate`` ``{"texts": [...], "target_lang": "de", "source_lang": "en", "beam": 5}``
  -> ``{"translations": [...], "source_lang", "target_lang", "beam", "model", "version"}``
  (translation models; ``target_lang`` is required when the model has several, ``source_lang``
  when a target has several sources);
- ``POST /v1/classify`` ``{"texts": ["...", ...]}`` (or ``[["a", "b"], ...]`` for a model trained
  on pairs) -> ``{"predictions": [{"label", "probabilities": {label: p}}], "labels", "model",
  "version"}``;
- both take optional ``"model"`` and ``"version"`` fields (see ``dispatch.py``); the answer
  names the version in its body and its ``X-Model`` / ``X-Model-Version`` headers;
- ``GET /healthz`` (always open): the models, their versions (weight, share, shadow, breaker,
  engine, checkpoint, memory) and, with one model, that model's description at the top level;
- ``GET /metrics`` (Prometheus text; needs the key when keys are on);
- ``POST /admin/reload`` (needs the key; refused on a server without keys): re-read the
  registry file (as SIGHUP does); 200 with what changed, 422 ``invalid_registry`` naming the
  problem (the running versions keep serving), 409 without ``--registry``.

A route no model serves answers 404 saying what this server serves. Every error is
``{"error": {"kind", "message", ...}}`` with a 4xx status (a 500 only for a failure inside the
model, logged with its traceback), and is counted in ``fairseq_moe_errors_total``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .auth import ApiKeys
from .breaker import OPEN
from .deployment import Deployment
from .dispatch import REQUEST_FIELDS, Dispatcher
from .engine import Engine
from .errors import ServeError
from .guard import Guard, install_error_handlers, version_headers
from .inputs import check_fields, optional_int, optional_str, read_json_object, texts_field
from .metrics import ServeMetrics
from .registry import DEFAULT_VERSION, registry_of_one
from .settings import ServeSettings
from .versions import VersionRuntime, parameter_bytes

__all__ = ["ServeSettings", "create_app", "deployment_of_engine"]

logger = logging.getLogger("fairseq_moe_plugin.serve")

TRANSLATE, CLASSIFY = "/v1/translate", "/v1/classify"


def deployment_of_engine(engine: Engine, settings: ServeSettings) -> Deployment:
    """The deployment of one loaded engine: model ``default``, version ``v1``."""
    spec = registry_of_one(engine.checkpoint)
    (model,) = spec.models.values()
    params = parameter_bytes(engine)
    memory = {"rss_delta_mib": None, "parameter_mib": round(params / (1 << 20), 1)}
    rt = VersionRuntime(model.versions[DEFAULT_VERSION], engine, memory)
    return Deployment(spec, {rt.label: rt}, ServeMetrics(), settings)


def create_app(served: Engine | Deployment, settings: ServeSettings,
               api_keys: ApiKeys | None = None):  # fmt: skip
    """The app serving ``served`` (a deployment, or one engine); the versions' batchers drain
    with the app's lifespan, and SIGHUP reloads when ``settings.reload_on_sighup``."""
    deployment = (
        served if isinstance(served, Deployment) else deployment_of_engine(served, settings)
    )
    metrics = deployment.metrics
    dispatcher = Dispatcher(deployment)

    async def reload(source: str) -> dict:
        try:
            report = await deployment.reload()
        except Exception as e:
            metrics.reloads.labels(outcome="refused").inc()
            logger.error("%s: reload refused, the running versions keep serving: %s", source, e,
                         exc_info=not isinstance(e, ValueError | OSError))  # fmt: skip
            raise
        metrics.reloads.labels(outcome="ok").inc()
        return report

    async def reload_on_signal() -> None:
        try:
            await reload("SIGHUP")
        except Exception:
            pass  # logged

    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        hup = False
        if settings.reload_on_sighup and deployment.spec.path is not None:
            try:
                loop.add_signal_handler(signal.SIGHUP,
                                        lambda: asyncio.ensure_future(reload_on_signal()))  # fmt: skip
                hup = True
            except (NotImplementedError, RuntimeError, ValueError) as e:  # not the main thread
                logger.warning("SIGHUP will not reload the registry here: %s", e)
        yield
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)
        await dispatcher.close()
        await deployment.close()  # drain every version's queue, then stop its worker

    app = FastAPI(title="fairseq-moe-serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.metrics = metrics
    app.state.deployment = deployment
    error_response = install_error_handlers(
        app, metrics, lambda: sorted(set(deployment.routes().values()))
    )
    app.add_middleware(Guard, metrics=metrics, api_keys=api_keys, error_response=error_response,
                       model_routes=(TRANSLATE, CLASSIFY))  # fmt: skip

    def answer(body: dict, rt) -> JSONResponse:
        model, version = rt.label
        return JSONResponse({**body, "model": model, "version": version},
                            headers=version_headers(model, version))  # fmt: skip

    @app.get("/healthz")
    async def healthz(request: Request):
        described = deployment.describe()
        out = {"status": "ok"}
        if len(deployment.spec.models) == 1:  # one model: its description, as before registries
            (name,) = deployment.spec.models
            first = next(rt for rt in deployment.model_versions(name) if not rt.spec.shadow)
            out.update(first.engine.describe())
        states = [rt.breaker.state for rt in deployment.versions.values()]
        if OPEN in states:
            out["status"] = "degraded"
        out.update(described)
        out["queue_texts"] = sum(rt.batcher.queued_items for rt in deployment.versions.values())
        return out

    @app.get("/metrics")
    async def metrics_route(request: Request):
        deployment.refresh_gauges()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/admin/reload")
    async def admin_reload(request: Request):
        if api_keys is None:
            raise ServeError(403, "admin_disabled", "reloading over HTTP needs API keys: start "
                             "the server with --api-key-file (or send it SIGHUP)")  # fmt: skip
        if deployment.spec.path is None:
            raise ServeError(409, "no_registry", "this server serves one checkpoint (started "
                             "without --registry): there is no registry to reload")  # fmt: skip
        try:
            report = await reload("POST /admin/reload")
        except Exception as e:
            raise ServeError(422, "invalid_registry", f"reload refused, the running versions "
                             f"keep serving: {e}") from e  # fmt: skip
        return {"status": "reloaded", **report, **deployment.describe()}

    @app.post(TRANSLATE)
    async def translate(request: Request):
        body = await read_json_object(request, settings.max_body_bytes)
        check_fields(body, TRANSLATE, ("texts", "target_lang", "source_lang", "beam",
                                       *REQUEST_FIELDS))  # fmt: skip

        def prepare(engine):
            texts = texts_field(body, settings.max_texts)
            target_lang, source_lang = (optional_str(body, "target_lang"),
                                        optional_str(body, "source_lang"))  # fmt: skip
            beam = engine.check_beam(optional_int(body, "beam"))
            source_lang, target_lang = engine.resolve_languages(target_lang, source_lang)
            items = [engine.encode(t, f"texts[{i}]", source_lang, target_lang)
                     for i, t in enumerate(texts)]  # fmt: skip
            fields = {"source_lang": source_lang, "target_lang": target_lang, "beam": beam}
            return (source_lang, target_lang, beam), items, fields

        outputs, fields, rt = await dispatcher.serve(request, TRANSLATE, body, prepare)
        return answer({"translations": outputs, **fields}, rt)

    @app.post(CLASSIFY)
    async def classify(request: Request):
        body = await read_json_object(request, settings.max_body_bytes)
        check_fields(body, CLASSIFY, ("texts", *REQUEST_FIELDS))

        def prepare(engine):
            texts = texts_field(body, settings.max_texts, pairs=True)
            items = [engine.encode(t, f"texts[{i}]") for i, t in enumerate(texts)]
            return "classify", items, {"labels": engine.labels}

        outputs, fields, rt = await dispatcher.serve(request, CLASSIFY, body, prepare)
        return answer({"predictions": outputs, **fields}, rt)

    return app
