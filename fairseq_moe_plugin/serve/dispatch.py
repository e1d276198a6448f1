"""One request through its versions: routed (``Deployment.resolve``), prepared by the chosen
version's engine, run on its batcher, its outcome given to the version's breaker; shadow copies
run beside it as tasks of their own.

A shadow copy is prepared and run by the shadow version's engine after the primary's input was
accepted; its answer is logged (logger ``fairseq_moe_plugin.serve.shadow``, INFO) and counted
(``shadow_requests_total{outcome}``: ``agree`` / ``differ`` with the primary's answer, ``error``,
or ``unpaired`` when the primary failed), and never returned. The primary never waits for it,
and its failure stays its own.

Request fields ``model`` and ``version`` name a model and version; otherwise the split
decides, sticky by the ``X-Request-ID`` header, else the API key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from . import traffic
from .auth import ApiKeys
from .errors import ServeError
from .inputs import optional_str

logger = logging.getLogger("fairseq_moe_plugin.serve")
shadow_logger = logging.getLogger("fairseq_moe_plugin.serve.shadow")
REQUEST_FIELDS = ("model", "version")


class Dispatcher:
    """Runs requests on the ``deployment``'s versions."""

    def __init__(self, deployment):
        self.deployment = deployment
        self._shadow_tasks: set[asyncio.Task] = set()

    async def serve(self, request, route: str, body: dict, prepare: Callable):
        """``prepare(engine) -> (batch key, items, response fields)`` checks the body for one
        engine (raising 4xx ``ServeError``s). Returns ``(outputs, fields, version)``."""
        model, version = optional_str(body, "model"), optional_str(body, "version")
        sticky = traffic.sticky_id(request.headers.get("x-request-id"),
                                   ApiKeys.presented(request.headers))  # fmt: skip
        choice = self.deployment.resolve(route, model, version, sticky)
        rt = choice.primary
        primary: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            try:
                key, items, fields = prepare(rt.engine)
            except BaseException:
                for s in choice.shadows:
                    s.release()
                raise
            for s in choice.shadows:
                task = asyncio.create_task(self._shadow(s, prepare, primary, rt, sticky))
                self._shadow_tasks.add(task)
                task.add_done_callback(self._shadow_tasks.discard)
            outputs = await self._run(rt, key, items)
            primary.set_result(outputs)
            return outputs, fields, rt
        except ServeError as e:
            e.at(*rt.label)
            raise
        finally:
            if not primary.done():
                primary.cancel()
            choice.release()

    async def _run(self, rt, key, items) -> list:
        """The version's outputs; a model failure is a 500 and counts against its breaker."""
        start = time.perf_counter()
        try:
            outputs = await rt.batcher.submit(key, items)
        except ServeError:  # busy or shutting down: not the version's failure
            raise
        except Exception as e:  # the batcher logged the traceback
            self.deployment.record(rt, False, time.perf_counter() - start)
            model, version = rt.label
            raise ServeError(500, "internal", f"the model failed (model {model} version "
                             f"{version}): {type(e).__name__}") from e  # fmt: skip
        self.deployment.record(rt, True, time.perf_counter() - start)
        return outputs

    async def _shadow(self, rt, prepare, primary: asyncio.Future, primary_rt, sticky) -> None:
        model, version = rt.label
        outcome, detail = "error", ""
        try:
            key, items, _ = prepare(rt.engine)
            outputs = await self._run(rt, key, items)
            await asyncio.wait({primary})
            if primary.cancelled() or primary.exception() is not None:
                outcome = "unpaired"
            else:
                outcome = "agree" if outputs == primary.result() else "differ"
            detail = repr(outputs)[:300]
        except Exception as e:  # bad input for this version, busy, or a model failure
            detail = e.message if isinstance(e, ServeError) else f"{type(e).__name__}: {e}"
        finally:
            rt.release()
            self.deployment.metrics.shadow.labels(model=model, version=version,
                                                  outcome=outcome).inc()  # fmt: skip
        shadow_logger.info("shadow model %s version %s (primary %s, sticky %s): %s: %s", model,
                           version, primary_rt.spec.name, sticky or "-", outcome, detail)  # fmt: skip

    async def close(self) -> None:
        """Let the shadow copies in flight finish (server shutdown, before the drain)."""
        await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
