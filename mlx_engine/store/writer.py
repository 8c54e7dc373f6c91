"""The writer thread: folds each batch into the statistics, gathers rows into shards, commits them.

The model runs on the caller's thread (MLX streams belong to the thread that made them);
this thread only does numpy and disk work, fed through a bounded queue, so disk I/O and
statistics overlap the next forward pass and at most `queue_size` batches wait in
memory. A shard is committed at the first batch boundary where it holds `shard_rows`
rows, in this order: shard file (temporary name, fsync, rename), documents.jsonl
flushed and fsynced, the running statistics saved under a new name, then the manifest
(the commit point; see manifest.py), and only then the previous statistics file removed.
"""

from __future__ import annotations

import io
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .corpus import Document
from .errors import StoreWriteError
from .manifest import DOCUMENTS, MANIFEST, shard_name, state_name
from .recorder import StoredHook
from .shards import as_float, write_durably, write_json_durably, write_shard
from .stats import NeuronStats


@dataclass
class BatchRows:
    """One batch's real rows (hook id -> [n, width] in the stored dtype) and their index."""

    index: int
    rows: dict[str, np.ndarray]
    tokens: np.ndarray  # int32 [n]
    doc: np.ndarray  # int64 [n]
    pos: np.ndarray  # int32 [n]
    documents: list[tuple[int, Document]]
    commit_after: bool = False  # end the shard after this batch (a rank's chunk ends: see store/ranks.py)


def save_states(out: Path, name: str, states: dict[str, NeuronStats], files: dict[str, str]) -> None:
    """Every hook's running state in one .npz (keys `{hook file}/{field}`), written durably."""
    arrays: dict[str, np.ndarray] = {}
    for hook_id, state in states.items():
        arrays.update(state.arrays(prefix=f"{files[hook_id]}/"))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_durably(out / name, buffer.getvalue())


def load_states(out: Path, name: str, files: dict[str, str]) -> dict[str, NeuronStats]:
    with np.load(out / name) as z:
        return {hook_id: NeuronStats.from_arrays(z, prefix=f"{file}/") for hook_id, file in files.items()}


class StoreWriter:
    """Consumes BatchRows on its own thread; `put` and `finish` raise StoreWriteError if it failed."""

    def __init__(
        self,
        out: Path,
        manifest: dict[str, Any],
        hooks: list[StoredHook],
        states: dict[str, NeuronStats],
        *,
        dtype: str,
        shard_rows: int,
        queue_size: int = 4,
        rank: int = 0,
        record: str = MANIFEST,
        write_documents: bool = True,
        on_commit: Optional[Callable[[dict[str, Any]], None]] = None,
    ) -> None:
        self.out = out
        self.manifest = manifest
        self.hooks = hooks
        self.files = {e["hook_id"]: e["file"] for e in manifest["hooks"]}
        self.states = states
        self.dtype = dtype
        self.shard_rows = shard_rows
        self.rank = rank
        self.record = record  # the commit record: manifest.json, or a rank's ranks/rankNNNN.json
        self.on_commit = on_commit
        self.queue: queue.Queue[Optional[BatchRows]] = queue.Queue(maxsize=queue_size)
        self.error: Optional[BaseException] = None
        self.stats_seconds = 0.0
        self.write_seconds = 0.0
        self._buffer: list[BatchRows] = []
        self._buffered = 0
        self._abort = threading.Event()
        # In a data-parallel job rank 0 writes every document (it replays the whole batch stream).
        self._documents: Any = open(out / DOCUMENTS, "ab") if write_documents else io.BytesIO()
        self._documents_written = manifest["shards"][-1]["documents_end"] if manifest["shards"] else 0
        self._thread = threading.Thread(target=self._run, name="mlx-engine-store-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, item: BatchRows) -> None:
        """Queue a batch, waiting while the queue is full; raise at once if the writer has failed."""
        while True:
            self._raise_if_failed()
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Commit the last (partial) shard and stop; raise if any write failed."""
        self.put(None)  # type: ignore[arg-type]
        self._thread.join()
        try:
            self._documents.close()
        except OSError as exc:
            self.error = self.error or exc
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without committing what is buffered (an interrupt): the store stays at its last commit."""
        self._abort.set()
        if self._thread.ident is None:  # never started
            self._documents.close()
            return
        while self._thread.is_alive():
            try:
                self.queue.put(None, timeout=0.2)
            except queue.Full:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join()
        try:
            self._documents.close()
        except OSError:  # the flush of uncommitted lines failed too (the disk is full): resume truncates them
            pass

    @property
    def documents_written(self) -> int:
        return self._documents_written

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            shards = self.manifest["shards"]
            rows = sum(s["rows"] for s in shards)
            raise StoreWriteError(
                f"Writing the activation store in {self.out} failed: {self.error}. The {len(shards)} complete shard(s) "
                f"({rows} rows) are intact and listed in {self.record}; fix the cause (free disk space?) and re-run the "
                "same command to resume."
            ) from self.error

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None or self._abort.is_set():
                    break
                self._take(item)
            if not self._abort.is_set():
                if self._buffered:
                    self._commit()
                self._sync_documents()  # documents after the last row (if any) are durable before "complete"
        except BaseException as exc:  # reported to the caller's thread by put/finish
            self.error = exc

    def _take(self, item: BatchRows) -> None:
        for number, doc in item.documents:
            if number != self._documents_written:
                raise RuntimeError(f"document {number} arrived out of order (expected {self._documents_written})")
            line = json.dumps({"doc": number, "source": doc.source, "text": doc.text}, ensure_ascii=False)
            self._documents.write(line.encode("utf-8") + b"\n")
            self._documents_written += 1
        started = time.perf_counter()
        if len(item.tokens):
            for hook_id, rows in item.rows.items():
                self.states[hook_id].update(as_float(rows, self.dtype), item.doc, item.pos)
        self.stats_seconds += time.perf_counter() - started
        self._buffer.append(item)
        self._buffered += len(item.tokens)
        if self._buffered >= self.shard_rows or (item.commit_after and self._buffered):
            self._commit()

    def _sync_documents(self) -> None:
        self._documents.flush()
        if not isinstance(self._documents, io.BytesIO):
            os.fsync(self._documents.fileno())

    def _commit(self) -> None:
        started = time.perf_counter()
        batches, self._buffer, rows = self._buffer, [], self._buffered
        self._buffered = 0
        shards = self.manifest["shards"]
        index = len(shards)
        name = shard_name(self.rank, index)
        tensors: dict[str, tuple[np.ndarray, str]] = {
            "tokens": (np.concatenate([b.tokens for b in batches]), "int32"),
            "doc": (np.concatenate([b.doc for b in batches]), "int64"),
            "pos": (np.concatenate([b.pos for b in batches]), "int32"),
        }
        for h in self.hooks:
            tensors[h.hook_id] = (np.concatenate([b.rows[h.hook_id] for b in batches]), self.dtype)
        size = write_shard(self.out / name, tensors, {"format": "mlx-engine-activation-store", "rank": str(self.rank)})
        self._sync_documents()
        previous = self.manifest["stats"].get("state")
        state = state_name(self.rank, index + 1)
        save_states(self.out, state, self.states, self.files)
        doc, pos = tensors["doc"][0], tensors["pos"][0]  # the shard's (doc, pos) range, for lookups by example
        shards.append({
            "file": name, "rank": self.rank, "index": index, "rows": rows, "bytes": size,
            "batches_end": batches[-1].index + 1, "documents_end": self._documents_written,
            "documents_bytes": self._documents.tell() if not isinstance(self._documents, io.BytesIO) else 0,
            "first": [int(doc[0]), int(pos[0])], "last": [int(doc[-1]), int(pos[-1])],
        })
        self.manifest["stats"]["state"] = state
        self.manifest["num_tokens"] = sum(s["rows"] for s in shards)
        self.write_seconds += time.perf_counter() - started
        if self.on_commit is not None:
            self.on_commit(self.manifest)
        write_json_durably(self.out / self.record, self.manifest)
        if previous and previous != state:
            (self.out / previous).unlink(missing_ok=True)
