"""Extraction jobs of the HTTP server: one store per job, written one batch per engine job.

An extraction can take hours, and the engine thread is the only thread that may run the
model, so a job never holds it for long: a driver thread (one per job, plain Python)
submits one `Extraction.step()` (one forward pass) at a time to the engine queue, so a
chat request queued meanwhile runs between two batches. The store is created (and the
input checked) by the first engine job, before POST answers, so bad input is a 4xx.
Cancelling stops the driver after the batch in flight: the writer is aborted, the store
stays `incomplete` and resumable, and its committed shards open as a store.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from ..hooks.session import HookBusyError
from ..store.extract import Extraction
from .engine import EngineThread

log = logging.getLogger("mlx_engine.server.extract")
BUSY_RETRY_S = 0.05  # a generation with activations holds the hook points: try the batch again after it
STATES = ("running", "completed", "cancelled", "failed")


def new_store_name() -> str:
    """A new folder name: UTC time (sorts by creation) and a random suffix (never collides)."""
    return datetime.now(timezone.utc).strftime("extract-%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


@dataclass
class ExtractJob:
    """One extraction as the routes report it; mutated by its driver thread only."""

    id: str
    model: str
    store: str  # the folder's name under the store root
    path: Path
    extraction: Optional[Extraction]  # released when the job ends (its statistics can be large)
    state: str = "running"
    error: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))
    finished_at: Optional[float] = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    final: Optional[dict[str, Any]] = None  # what GET reports once the job has ended

    def to_json(self) -> dict[str, Any]:
        if self.final is not None:
            return dict(self.final)
        assert self.extraction is not None
        run = self.extraction.run
        m = self.extraction.manifest
        total = m["corpus"]["documents"]
        return {
            "id": self.id, "object": "extract.job", "model": self.model, "state": self.state, "store": self.store,
            "created": self.created,
            "documents_total": total,
            "documents_done": total if self.extraction.complete else (run.documents_done if run else 0),
            "tokens_done": (run.tokens_done + run.run_tokens) if run else m["num_tokens"],
            "tokens_per_second": run.tokens_per_second if run else None,
            "eta_seconds": (run.eta_seconds() if run and self.state == "running" else None),
            "shards": len(m["shards"]),
            "error": self.error,
        }


class ExtractJobs:
    """The server's extraction jobs by id (kept for the server's lifetime)."""

    def __init__(self) -> None:
        self._jobs: dict[str, ExtractJob] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Optional[ExtractJob]:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[ExtractJob]:
        with self._lock:
            return list(self._jobs.values())

    def start(self, engine: EngineThread, model: str, store: str, path: Path, begin: Callable[[], Extraction]) -> ExtractJob:
        """Create the store on the engine thread (raising for bad input), then drive it in the background."""
        extraction = engine.call(begin)
        job = ExtractJob(id=f"extract-{secrets.token_hex(8)}", model=model, store=store, path=path, extraction=extraction)
        with self._lock:
            self._jobs[job.id] = job
        threading.Thread(target=_drive, args=(engine, job), name=f"mlx-engine-{job.id}", daemon=True).start()
        return job

    def cancel(self, job: ExtractJob, wait_s: float) -> None:
        """Ask the job to stop after its batch in flight; wait up to `wait_s` for it to stop."""
        job.cancel_requested.set()
        job.done.wait(wait_s)


def _drive(engine: EngineThread, job: ExtractJob) -> None:
    """The job's loop: one engine job per batch, until done, cancelled or failed."""
    extraction = job.extraction
    assert extraction is not None
    try:
        while not job.cancel_requested.is_set():
            try:
                if not engine.call(extraction.step):
                    break
            except HookBusyError:
                time.sleep(BUSY_RETRY_S)
        if job.cancel_requested.is_set() and extraction.run is not None and not extraction.run.finished:
            engine.call(extraction.abort)
            job.state = "cancelled"
        else:
            engine.call(extraction.finish)
            job.state = "completed"
    except BaseException as exc:  # reported by GET; the store keeps its committed shards
        log.warning("extraction %s failed: %s", job.id, exc)
        job.state, job.error = "failed", str(exc)
        try:
            engine.call(extraction.abort)
        except BaseException:
            pass
    finally:
        job.finished_at = time.time()
        job.final = {**job.to_json(), "tokens_per_second": _rate(extraction), "eta_seconds": None}
        job.extraction = None
        job.done.set()


def _rate(extraction: Extraction) -> Optional[float]:
    run = extraction.run
    return run.run_tokens / run.elapsed if run is not None and run.run_tokens else None
