"""`ExtractionRun`: the pass itself, one batch per `step()`, so a caller can interleave other work.

`extract` drives it to the end at once; the HTTP server drives it one batch per engine
job, so chat requests queued meanwhile run between two batches. The hook points are
armed only inside a step (the model is free between steps), the forward runs on the
caller's thread (MLX streams belong to the thread that made them; the server's is its
engine thread) and the writer thread folds statistics and writes shards behind a
bounded queue.

In a data-parallel job every rank replays the same batch stream and runs only the
batches it owns (store/ranks.py says which); rank 0 also hands the writer the
documents of every batch, so documents.jsonl is written once, in order. In a
model-parallel job rank 0 runs every batch and the others follow it
(store/model_parallel.py).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import numpy as np

from ..loading import ModelKit, tokenize
from .corpus import Corpus
from .manifest import MANIFEST
from .plan import Batch, plan_batches
from .recorder import BatchRecorder, StoredHook
from .stats import NeuronStats
from .writer import BatchRows, StoreWriter

TIMERS = ("elapsed_seconds", "compute_seconds", "stats_seconds", "write_seconds")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def batch_plan(kit: ModelKit, corpus: Corpus, options: dict[str, Any]) -> Iterator[Batch]:
    """The deterministic batch stream of these settings: every rank of a job replays the same one."""
    return plan_batches(corpus, lambda text: tokenize(kit, text), context_size=options["context_size"],
                        batch_size=options["batch_size"], packed=options["packed"], max_tokens=options["max_tokens"])


def recorder_for(kit: ModelKit, stored: list[StoredHook], options: dict[str, Any]) -> BatchRecorder:
    """The recorder of these hooks, padding with the tokenizer's pad token (0 if it has none)."""
    pad = getattr(kit.tokenizer, "pad_token_id", None)
    return BatchRecorder(kit.hook_points, stored, options["dtype"], pad if isinstance(pad, int) else 0)


class ExtractionRun:
    """One run (first or resumed) over the corpus into `out`, committing to `record`."""

    def __init__(
        self, kit: ModelKit, corpus: Corpus, stored: list[StoredHook], out: Path, manifest: dict[str, Any],
        states: dict[str, NeuronStats], options: dict[str, Any], *, total_documents: int, record: str,
        owns: Callable[[int], bool] = lambda index: True, chunk_end: Callable[[int], bool] = lambda index: False,
        rank: int = 0, progress: bool = False, queue_size: int = 4,
        forward_guard: Callable[[int], ContextManager[Any]] = lambda index: nullcontext(),
    ) -> None:
        self.kit, self.stored, self.out, self.manifest, self.options = kit, stored, out, manifest, options
        self.owns, self.chunk_end, self.rank = owns, chunk_end, rank
        self.forward_guard = forward_guard  # around each forward: a model-parallel job's agreement (model_parallel.py)
        self.total_documents = total_documents
        shards = manifest["shards"]
        self._skip = shards[-1]["batches_end"] if shards else 0
        self.documents_done = shards[-1]["documents_end"] if shards else 0
        self._documents_start = self.documents_done
        self.tokens_done = manifest["num_tokens"]
        self.run_tokens = 0
        timings = manifest["timings"]
        timings["runs"] += 1
        self._base = {k: timings[k] for k in TIMERS}
        self._compute = 0.0
        self._started = time.perf_counter()
        self.recorder = recorder_for(kit, stored, options)
        self._storage = np.uint16 if options["dtype"] == "bfloat16" else np.dtype(options["dtype"])
        self.recorder.arm()  # refuses a model busy with another session before any file is opened
        self.recorder.disarm()
        self.writer = StoreWriter(out, manifest, stored, states, dtype=options["dtype"], shard_rows=options["shard_tokens"],
                                  queue_size=queue_size, rank=rank, record=record, write_documents=rank == 0,
                                  on_commit=self._on_commit)
        self._plan = batch_plan(kit, corpus, options)
        self._bar: Optional[Any] = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_documents, initial=self.documents_done, unit="doc", file=sys.stderr,
                             desc=f"extract -> {out.name}" + (f" (rank {rank})" if record != MANIFEST else ""),
                             dynamic_ncols=True)
        self.finished = False
        self.writer.start()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    @property
    def tokens_per_second(self) -> Optional[float]:
        return self.run_tokens / self.elapsed if self.run_tokens else None

    def eta_seconds(self) -> Optional[float]:
        """Seconds left at this run's rate of documents (None before the first document)."""
        done = self.documents_done - self._documents_start
        left = self.total_documents - self.documents_done
        rate = done / self.elapsed if done else 0.0
        return left / rate if rate else None

    def _on_commit(self, m: dict[str, Any]) -> None:
        t = m["timings"]
        t["updated"] = now()
        t["elapsed_seconds"] = self._base["elapsed_seconds"] + self.elapsed
        t["compute_seconds"] = self._base["compute_seconds"] + self._compute
        t["stats_seconds"] = self._base["stats_seconds"] + self.writer.stats_seconds
        t["write_seconds"] = self._base["write_seconds"] + self.writer.write_seconds
        t["tokens_per_second"] = m["num_tokens"] / t["elapsed_seconds"] if t["elapsed_seconds"] else None
        m["num_documents"] = self.writer.documents_written

    def step(self) -> bool:
        """Run the next batch this rank owns (replaying committed ones without the model); False at the end.

        A HookBusyError (another session holds the hook points) is raised before any batch
        is taken, so the caller may simply call again later.
        """
        self.recorder.arm()
        try:
            for batch in self._plan:
                if batch.index < self._skip:
                    continue
                mine = self.owns(batch.index)
                if not mine and self.rank != 0:  # another rank's batch: only counted, for the progress bar
                    self._count(len(batch.documents), 0)
                    continue
                self._put(batch, mine)
                if mine:
                    return True
        finally:
            self.recorder.disarm()
        self.writer.finish()
        self.finished = True
        self._on_commit(self.manifest)
        self._close_bar()
        return False

    def _put(self, batch: Batch, mine: bool) -> None:
        t0 = time.perf_counter()
        if batch.windows and mine:
            with self.forward_guard(batch.index):
                rows = self.recorder.run(self.kit.model, [w.tokens for w in batch.windows])
            windows = batch.windows
        else:
            rows = {h.hook_id: np.empty((0, h.width), self._storage) for h in self.stored}
            windows = []
        self._compute += time.perf_counter() - t0
        index = [np.concatenate([getattr(w, f) for w in windows]) if windows else np.empty(0, dt)
                 for f, dt in (("tokens", np.int32), ("doc", np.int64), ("pos", np.int32))]
        documents = batch.documents if self.rank == 0 else []
        self.writer.put(BatchRows(batch.index, rows, *index, documents, commit_after=mine and self.chunk_end(batch.index)))
        self._count(len(batch.documents), sum(len(w) for w in windows))

    def _count(self, documents: int, rows: int) -> None:
        self.documents_done += documents
        self.run_tokens += rows
        if self._bar is not None:
            self._bar.update(documents)
            rate = self.run_tokens / max(self.elapsed, 1e-9)
            self._bar.set_postfix_str(f"{self.tokens_done + self.run_tokens:,} tok, {rate:,.0f} tok/s", refresh=False)

    def run_to_end(self) -> None:
        try:
            while self.step():
                pass
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop without committing what is buffered: the store stays at its last commit (resumable)."""
        if not self.finished:
            self.writer.abort()
            self.finished = True
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
