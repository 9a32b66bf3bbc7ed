"""One thread that runs every model call of a server, batching the requests that wait for it.

Web requests arrive on many threads; the model runs on one (`ModelWorker`). While it works, new
requests queue; when it is free it takes the oldest one together with every waiting request of the same
kind and settings (`key`), up to `max_batch` samples, and runs them as one batch. The samplers make an
image depend only on its prompt, seed and settings (a caption only on its image, seed and settings), so
a request gets the same output whether it ran alone or batched with others.

The worker holds at most `max_pending` requests; one more is refused at once with `Busy`, never left to
hang. Nothing here imports a web framework: the Gradio page (`mmfusion.serving.app`) and any other
front end submit through `ModelWorker.submit`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mmfusion.errors import UserError


class Busy(UserError):
    """The server holds as many requests as it may: try again shortly."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the server is busy: {limit} requests are waiting or running; try again shortly")


@dataclass
class _Job:
    key: Hashable
    items: list[Any]
    run: Callable[[list[Any]], Sequence[Any]]
    future: Future = field(default_factory=Future)


@dataclass
class WorkerStats:
    """What the worker ran: requests served, model calls (batches) made, and the largest batch."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0


class ModelWorker:
    """Runs `submit`ted jobs on one thread, jobs of equal `key` batched together.

    `max_batch`: samples per model call (a request of more samples runs alone, whole). `max_pending`:
    requests waiting or running at once; past it `submit` raises `Busy`. `gather_seconds`: how long at
    most the worker may wait for the next batch to fill (`_take` says up to what)."""

    def __init__(self, max_batch: int = 16, max_pending: int = 64, gather_seconds: float = 0.15) -> None:
        if max_batch < 1 or max_pending < 1:
            raise UserError(f"max_batch and max_pending must be at least 1, got {max_batch} and {max_pending}")
        self.max_batch, self.max_pending, self.gather_seconds = max_batch, max_pending, gather_seconds
        self.stats = WorkerStats()
        self._jobs: deque[_Job] = deque()
        self._running = 0
        self._last_batch = 1  # samples in the last batch: how many to wait for in the next
        self._last_seconds = gather_seconds  # how long it ran: waiting longer would cost more than it saves
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mmfusion-model", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, items: list[Any], run: Callable[[list[Any]], Sequence[Any]]) -> list[Any]:
        """`run(items)` (one output per item), batched with other jobs of the same `key`; blocks until
        done and returns this job's outputs, or raises what `run` raised."""
        job = _Job(key, list(items), run)
        with self._cond:
            if self._closed:
                raise UserError("the server is shutting down")
            if len(self._jobs) + self._running >= self.max_pending:
                raise Busy(self.max_pending)
            self._jobs.append(job)
            self._cond.notify()
        return job.future.result()

    def close(self) -> None:
        """Stop after the jobs already taken; waiting jobs fail with a message."""
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.future.set_exception(UserError("the server is shutting down"))
            self._jobs.clear()
            self._cond.notify()
        self._thread.join(timeout=60)

    def _take(self) -> list[_Job]:
        """The oldest job and the waiting jobs of its key that fit into one batch with it. Before taking
        them, the worker waits up to `gather_seconds` for the samples of its last batch and those that
        came while it ran: the people just served tend to send their next request at once, and a fuller
        batch costs less per sample. (Waiting for the last batch's size alone let steady clients settle
        into two smaller batches that took turns.) Never longer than the last batch ran: the
        late ones can run in a batch of their own for about that."""
        with self._cond:
            target = min(self.max_batch, max(1, self._last_batch + self._waiting_samples()))
            while not self._jobs and not self._closed:
                self._cond.wait()
            deadline = time.monotonic() + min(self.gather_seconds, self._last_seconds)
            while not self._closed and self._waiting_samples() < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed:
                return []
            first = self._jobs.popleft()
            batch, size = [first], len(first.items)
            for job in list(self._jobs):
                if job.key == first.key and size + len(job.items) <= self.max_batch:
                    self._jobs.remove(job)
                    batch.append(job)
                    size += len(job.items)
            self._running, self._last_batch = len(batch), size
        return batch

    def _waiting_samples(self) -> int:
        return sum(len(job.items) for job in self._jobs)

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            start = time.monotonic()
            self._run(batch)
            with self._cond:
                self._running, self._last_seconds = 0, time.monotonic() - start

    def _run(self, batch: list[_Job]) -> None:
        items = [item for job in batch for item in job.items]
        try:
            outputs = list(batch[0].run(items))
            if len(outputs) != len(items):
                raise RuntimeError(f"a batch of {len(items)} items gave {len(outputs)} outputs")
        except BaseException as err:  # noqa: BLE001 - every waiting request learns what went wrong
            for job in batch:
                job.future.set_exception(err)
            return
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(items))
        start = 0
        for job in batch:
            job.future.set_result(outputs[start : start + len(job.items)])
            start += len(job.items)
