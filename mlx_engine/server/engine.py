"""The one thread that does model work, and the queue that feeds it.

MLX arrays and streams belong to the thread that created them, so loading, generating
and encoding captures all run here, one job at a time in arrival order. A generation
that may be batched runs only its prefill as a job, then joins the running batch
(batching.py); while a batch decodes, the thread alternates between one decode step and
the next queued job, so requests join and leave between steps, served first come first
served, none dropped. Request threads only submit jobs and read what a job hands back,
which is plain Python data (dicts, strings, bytes), never an mx.array.

A streaming job hands its events through a bounded queue. The reader may cancel it
(client gone); the job sees that at its next event, within one generation step, or
between two prefill chunks of a long prompt, and the engine moves on to the next job.

`quiesce` is for shutdown: jobs still queued are refused (`EngineStopped`) instead of
run, and once the running ones end (every row of the batch) the thread stays parked in its queue wait. It is not
joined on purpose: MLX keeps per-thread caches whose destructors run as the thread ends
and need the GIL; racing the interpreter's finalization they abort the process. A thread
blocked in a lock wait is simply gone when the process exits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from .batching import Batcher

log = logging.getLogger("mlx_engine.server.engine")

T = TypeVar("T")
_STREAM_BUFFER = 64
_POLL_S = 0.05


class Cancelled(Exception):
    """Raised inside a streaming job when its reader has gone away."""

    def __init__(self, during_prefill: bool = False) -> None:
        super().__init__("the reader went away")
        self.during_prefill = during_prefill


class EngineStopped(RuntimeError):
    """The engine is stopping (server shutdown): a queued job was refused, not run."""

    def __init__(self) -> None:
        super().__init__("The engine thread is stopping.")


class _End:
    """Marks the end of a stream's events."""


END = _End()


class EventStream:
    """The reading end of a streaming job, used by one request thread."""

    def __init__(self) -> None:
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=_STREAM_BUFFER)
        self._cancelled = threading.Event()

    # -- engine side
    def emit(self, event: Any) -> None:
        """Hand an event to the reader, waiting while its buffer is full; raise Cancelled if it left."""
        while True:
            if self._cancelled.is_set():
                raise Cancelled()
            try:
                self._queue.put(event, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _finish(self, error: Optional[BaseException]) -> None:
        if self._cancelled.is_set():
            return
        if error is not None:
            self._force_put(error)
        self._force_put(END)

    def _force_put(self, item: Any) -> None:
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # -- request side
    def cancel(self) -> None:
        """Stop the job at its next event (or before it starts, if still queued)."""
        self._cancelled.set()

    def next(self, timeout: float) -> Any:
        """The next event, or END; raises queue.Empty after `timeout`, or the job's exception."""
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass
class EngineStats:
    completed_generations: int = 0
    cancelled_generations: int = 0
    cancelled_in_prefill: int = 0  # of the cancelled: stopped between two prefill chunks
    failed_generations: int = 0


# A streaming job may hand its rest to the batch: it returns `adopt`, which the engine calls
# with the function the batch calls once the job's generation ends (None: it completed).
Adopt = Callable[[Callable[[Optional[BaseException]], None]], None]


class EngineThread:
    """A single daemon thread running submitted jobs in order, and decoding the batch between them."""

    def __init__(self, name: str = "mlx-engine", batcher: Optional[Batcher] = None) -> None:
        self.batcher = batcher if batcher is not None else Batcher()
        self._jobs: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._pending = 0
        self._busy = False
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.stats = EngineStats()
        self._thread.start()

    # -- status
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self._busy or self.batcher.active

    @property
    def queue_depth(self) -> int:
        """Jobs waiting, not counting the one running."""
        with self._lock:
            return self._pending

    def on_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # -- submitting
    def call(self, fn: Callable[[], T], timeout: Optional[float] = None) -> T:
        """Run `fn` on the engine thread and return its result (or raise its exception)."""
        if self.on_engine_thread():
            return fn()
        future: "Future[T]" = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            if self._stopping.is_set():
                future.set_exception(EngineStopped())
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, never kills the thread
                future.set_exception(exc)

        self._put(job)
        return future.result(timeout=timeout)

    def stream(self, request_id: str, fn: Callable[[EventStream], Optional[Adopt]]) -> EventStream:
        """Run `fn(stream)` on the engine thread; it emits events the caller reads from `stream`.

        `fn` either runs to its end or returns an `Adopt` that hands its rest to the batch.
        """
        stream = EventStream()

        def job() -> None:
            if stream.cancelled or self._stopping.is_set():
                log.info("request %s: cancelled while queued", request_id)
                self.stats.cancelled_generations += 1
                stream._finish(EngineStopped() if self._stopping.is_set() else None)
                return
            try:
                adopt = fn(stream)
            except BaseException as exc:
                self._settle(request_id, stream, exc)
                return
            if adopt is None:
                self._settle(request_id, stream, None)
            else:
                adopt(lambda exc: self._settle(request_id, stream, exc))

        self._put(job)
        return stream

    def _settle(self, request_id: str, stream: EventStream, exc: Optional[BaseException]) -> None:
        """Count a generation's end and close its stream (with the error, if it failed)."""
        error: Optional[BaseException] = None
        if exc is None:
            self.stats.completed_generations += 1
        elif isinstance(exc, Cancelled):
            self.stats.cancelled_generations += 1
            self.stats.cancelled_in_prefill += int(exc.during_prefill)
            when = "during the prefill" if exc.during_prefill else "while generating"
            log.info("request %s: reader went away %s; generation stopped", request_id, when)
        else:
            self.stats.failed_generations += 1
            error = exc
        stream._finish(error)

    def quiesce(self, timeout: float) -> bool:
        """Refuse queued jobs and wait for the running one to end; whether the thread is idle in time."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        while self.busy or self.queue_depth:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S / 5)
        return True

    def stop(self, timeout: float = 5.0) -> bool:
        """Refuse queued jobs, let the running one end, join the thread (tests and embedders
        that keep the interpreter running); whether it ended in time."""
        self._stopping.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put(self, job: Callable[[], None]) -> None:
        if not self.alive or self._stopping.is_set():
            raise EngineStopped()
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    def _next_job(self) -> Optional[Callable[[], None]]:
        """The next queued job; while a batch decodes, its next step when no job waits or it is full."""
        while self.batcher.active:
            if not self.batcher.full:
                try:
                    return self._jobs.get_nowait()
                except queue.Empty:
                    pass
            self._busy = True
            try:
                self.batcher.step()
            finally:
                self._busy = False
        return self._jobs.get()

    def _run(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                self.batcher.close(EngineStopped())
                return
            with self._lock:
                self._pending -= 1
            self._busy = True
            try:
                job()
            except BaseException:  # a job's own handler failed; keep serving the others
                log.exception("engine job failed")
            finally:
                self._busy = False
