"""Dynamic batching: requests that arrive close together share one model call.

One worker thread owns the model. Request handlers (coroutines on the event loop) ``submit`` a
job: its batch key (e.g. ``(source, target, beam)``) and its encoded items; they await a
``concurrent.futures.Future`` wrapped for asyncio, so the event loop never waits on the model.

The worker takes the oldest job, then waits until ``max_wait`` after that job's arrival for more
jobs with the same key, as long as the batch's padded size (items x longest item) stays within
``max_batch_tokens``; it stops waiting as soon as the next job would not fit. Jobs with another
key keep their place for a later batch. ``max_wait = 0`` turns batching off: one job per batch.

A batch that fails is run again job by job, so that a request the model cannot run fails alone
(a 500 for it) and the others get their answers.

``close()`` (at server shutdown, after uvicorn has let in-flight requests finish) refuses new
jobs, runs every queued job without waiting, and joins the worker.

What this adds over a plain executor (``loop.run_in_executor``): jobs grouped by key into one
model call within a time window and a size budget, and drained at shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from .errors import ServeError

logger = logging.getLogger("fairseq_moe_plugin.serve")


@dataclass
class Job:
    key: Hashable
    items: Sequence  # encoded inputs; each has a length (``numel()`` or ``len()``)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def longest(self) -> int:
        return max(_size(item) for item in self.items)


def _size(item) -> int:
    return item.numel() if hasattr(item, "numel") else len(item)


@dataclass
class Batch:
    key: Hashable
    jobs: list[Job]
    waited: float  # seconds from the first job's arrival to the batch's start
    seconds: float = 0.0  # the model's time on the batch (set once it has run)

    @property
    def items(self) -> list:
        return [item for job in self.jobs for item in job.items]


class DynamicBatcher:
    """Groups jobs into batches and runs them on one worker thread.

    Args:
        run: ``run(key, items) -> result`` with ``result.outputs`` one output per item (the
            engine's ``run``); called on the worker thread only.
        max_wait: seconds to wait for more jobs after a batch's first one (0: no batching).
        max_batch_tokens: the padded size (items x longest item) a batch may reach; a single
            job larger than that runs alone.
        max_queue_items: items queued at most; beyond, ``submit`` answers 503.
        on_batch: called on the worker thread after each batch with ``(batch, result)``.
    """

    def __init__(
        self,
        run: Callable,
        max_wait: float,
        max_batch_tokens: int,
        max_queue_items: int = 4096,
        on_batch: Callable | None = None,
    ):
        self.run = run
        self.max_wait = max_wait
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_items = max_queue_items
        self.on_batch = on_batch
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="fairseq-moe-batcher", daemon=True)
        self._thread.start()

    @property
    def queued_items(self) -> int:
        with self._cond:
            return sum(len(job.items) for job in self._queue)

    def put(self, key: Hashable, items: Sequence) -> Job:
        """Queue a job (any thread); its ``future`` gets the job's outputs, in order."""
        job = Job(key=key, items=items)
        with self._cond:
            if self._closing:
                raise ServeError(503, "shutting_down", "the server is shutting down")
            if sum(len(j.items) for j in self._queue) + len(items) > self.max_queue_items:
                raise ServeError(
                    503, "busy", f"the server has {self.max_queue_items} texts queued: retry later"
                )
            self._queue.append(job)
            self._cond.notify()
        return job

    async def submit(self, key: Hashable, items: Sequence) -> list:
        """Queue a job and await its outputs without blocking the event loop."""
        job = self.put(key, items)
        return await asyncio.wrap_future(job.future)

    def close(self) -> None:
        """Refuse new jobs, run the queued ones, stop the worker (blocks until it has)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    # -- worker -------------------------------------------------------------------------

    def _select(self, key: Hashable) -> tuple[list[Job], bool]:
        """The queued jobs that would form a batch with ``key`` now (oldest first), and
        whether the batch is full (the next job with that key does not fit)."""
        chosen: list[Job] = []
        items = longest = 0
        for job in self._queue:
            if job.key != key:
                continue
            new_longest = max(longest, job.longest)
            if chosen and (items + len(job.items)) * new_longest > self.max_batch_tokens:
                return chosen, True
            chosen.append(job)
            items, longest = items + len(job.items), new_longest
            if self.max_wait <= 0:  # batching off: one job per batch
                return chosen, True
        return chosen, items * longest >= self.max_batch_tokens

    def _next_batch(self) -> Batch | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None  # closing and drained
            first = self._queue[0]
            deadline = first.arrived + self.max_wait
            while True:
                jobs, full = self._select(first.key)
                remaining = deadline - time.monotonic()
                if full or self._closing or remaining <= 0:
                    break
                self._cond.wait(remaining)
            for job in jobs:
                self._queue.remove(job)
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        return Batch(key=first.key, jobs=jobs, waited=time.monotonic() - first.arrived)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch.jobs:  # every job was cancelled (clients gone)
                continue
            try:
                self._run_batch(batch)
            except Exception as e:  # one job alone failed: answer it, keep serving
                logger.exception("a batch of %d texts failed", len(batch.items))
                batch.jobs[0].future.set_exception(e)

    def _run_batch(self, batch: Batch) -> None:
        """Run a batch and answer its jobs. When a batch of several jobs fails, each job is run
        alone, so that one bad request fails alone; a single job's failure is raised."""
        start = time.perf_counter()
        try:
            result = self.run(batch.key, batch.items)
        except Exception:
            if len(batch.jobs) == 1:
                raise
            logger.exception("a batch of %d requests failed: running them one by one",
                             len(batch.jobs))  # fmt: skip
            for job in batch.jobs:
                try:
                    self._run_batch(Batch(key=batch.key, jobs=[job], waited=batch.waited))
                except Exception as e:
                    job.future.set_exception(e)
            return
        batch.seconds = time.perf_counter() - start
        if self.on_batch is not None:  # before the answers: a client that got one sees it
            try:
                self.on_batch(batch, result)
            except Exception:  # metrics must never stop the worker
                logger.exception("on_batch failed")
        first = 0
        for job in batch.jobs:
            job.future.set_result(result.outputs[first : first + len(job.items)])
            first += len(job.items)
