"""Data-parallel extraction over `mx.distributed`: which rank runs which batch, and the merge.

Split: every rank replays the same deterministic batch stream (store/plan.py) and runs
the batches of its chunks: chunk c (the batches [c*G, (c+1)*G), G batches of about one
shard) belongs to rank c mod world_size. A rank ends a shard at the end of each of its
chunks, so each shard holds a contiguous run of the corpus, and the shards of all ranks
sorted by their first (doc, pos) are the rows of a one-process run in the same order.
The batches themselves are the one-process batches (same windows, same padding), so
every row is bit-identical to the one-process store's.

Merge: each rank commits its own shards and a record (ranks/rankNNNN.json, what a
resume reads); at the end the records and statistics states travel to rank 0 with
`mx.distributed.all_gather` of their serialized bytes. Collectives rather than a shared
folder: ranks on several machines need no shared filesystem for the statistics, and
there is no polling. Rank 0 merges the states (NeuronStats.merge: exact counts, extrema
and top-k; moments by the pairwise formulas, equal to the one-process values up to
float64 rounding) and writes the one manifest that lists every rank's shards.

Every decision that could fail on one rank (bad input, a refused folder, a write
error) is followed by `agree`, an all_gather of each rank's status, so a failure on one
rank becomes an error on all of them instead of leaving the others waiting in a
collective. A rank that dies outright (killed, out of memory, its machine gone) cannot
agree to anything: the ring backend fails a transfer in flight, but a collective started
after its socket thread gave up waits forever (distributed/watchdog.py), and a peer whose
sockets stay open (a frozen process, a machine gone off the network) is never noticed. So every
collective of a bounded group (`RankGroup.bounded`) runs under a watchdog: not returned
after `timeout_s`, the rank prints which step it was waiting at and exits 1. The wait
cannot be interrupted (the thread is inside C++), hence `os._exit`, and that is safe
because no collective runs while the writer thread is busy: every commit the rank made is
already durable (a shard, then its record, each renamed into place), and `settle` makes
sure of it before the exit. A failed transfer ends the same way, as a RankLostError. The
timeout must outlast a legitimate wait: another rank finishing its last chunks. Re-run the
same command on every rank: each resumes after its last committed shard.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..distributed.watchdog import Watchdog
from .errors import StoreError
from .stats import NeuronStats

RANK_TIMEOUT_S = 600.0  # a legitimate wait is another rank finishing its last chunks: generous
RANK_LOST_EXIT = 1  # the exit status of a rank that gave up on the others (the run failed; the input was fine)
AFTER_LOSS = ("a rank has stopped; the shards committed so far are kept; re-run the same command on every rank to "
              "resume")


class RankLostError(RuntimeError):
    """A collective failed because another rank went away; every shard committed so far is intact."""


class RankFailedError(StoreError):
    """Another rank reported a failure at a step every rank agrees on (its own log says why)."""


class CollectiveBound:
    """Ends this process when one of its collectives has not returned after `timeout_s`.

    A watchdog (distributed/watchdog.py) counts only while a collective runs. When it
    fires, from its own thread, `settle` runs first (it waits for a commit in progress, if
    any), then the error goes to stderr and `exit(RANK_LOST_EXIT)` ends the process: the
    stuck call never returns, so nothing on the waiting thread could report it.
    """

    def __init__(self, rank: int, timeout_s: float, settle: Callable[[], object] = lambda: None,
                 exit: Callable[[int], Any] = os._exit) -> None:
        self.rank, self.timeout_s = rank, timeout_s
        self._settle, self._exit = settle, exit
        self._what = ""
        self._watchdog = Watchdog(timeout_s, self._stalled)

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """The block is a collective at step `what` (named in the error if it never returns)."""
        self._what = what
        self._watchdog.busy(True)
        try:
            yield
        finally:
            self._watchdog.busy(False)

    def message(self) -> str:
        return (f"rank {self.rank} waited {self.timeout_s:g} s for the other ranks at '{self._what}': {AFTER_LOSS} "
                "(a rank that is only slow needs a longer --rank-timeout / rank_timeout_s)")

    def _stalled(self, seconds: float) -> None:
        """From the watchdog's thread (`seconds`, at least `timeout_s`, is how long the collective has run)."""
        try:
            self._settle()
        finally:
            sys.stdout.flush()
            print(f"error: {self.message()}", file=sys.stderr, flush=True)
            self._exit(RANK_LOST_EXIT)

    def close(self) -> None:
        """The job is over: the watchdog's thread ends and never fires."""
        self._watchdog.stop()


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the job; world size 1 when not launched as a distributed job."""

    group: Any
    rank: int
    size: int
    bound: Optional[CollectiveBound] = field(default=None, compare=False)

    @classmethod
    def current(cls) -> "RankGroup":
        import mlx.core as mx

        if not mx.distributed.is_available():
            return cls(None, 0, 1)
        group = mx.distributed.init()
        return cls(group, group.rank(), group.size())

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def bounded(self, timeout_s: float, settle: Callable[[], object] = lambda: None) -> "RankGroup":
        """This group with each collective bounded by `timeout_s` (CollectiveBound); a world of 1 has none."""
        if not self.distributed:
            return self
        return replace(self, bound=CollectiveBound(self.rank, timeout_s, settle))

    def _all_gather(self, rows: np.ndarray, what: str) -> np.ndarray:
        """Every rank's `rows` [1, n] as [size, n]; bounded by the watchdog, a lost rank a RankLostError."""
        import mlx.core as mx

        with self.bound.waiting(what) if self.bound is not None else nullcontext():
            try:
                out = mx.distributed.all_gather(mx.array(rows), group=self.group)
                mx.eval(out)
            except RuntimeError as exc:  # the ring backend's "connection to a peer was lost" and the like
                raise RankLostError(f"rank {self.rank} lost the other ranks at '{what}' ({exc}): {AFTER_LOSS}") from exc
        return np.array(out).reshape(self.size, -1)

    def waiting(self, what: str) -> Any:
        """A context for work that is a collective without being one of ours (a model-parallel forward):
        bounded like `exchange` when the group is bounded."""
        return self.bound.waiting(what) if self.bound is not None else nullcontext()

    def exchange(self, values: list[int], what: str) -> np.ndarray:
        """Every rank's `values` (the same length on every rank), as [size, len(values)]; `what`: the step, for errors."""
        return self._all_gather(np.asarray(values, dtype=np.int64).astype(np.int32).reshape(1, -1), what)

    def agree(self, error: Optional[BaseException], what: str) -> None:
        """Raise on every rank if any rank failed at `what` (the local error where it is this rank's)."""
        failed = self.exchange([int(error is not None)], what)[:, 0]
        if error is not None:
            raise error
        if failed.any():
            ranks = ", ".join(str(r) for r in np.nonzero(failed)[0])
            raise RankFailedError(f"Rank(s) {ranks} of the job failed {what}; their log says why. Fix it and re-run the same command.")

    def gather_bytes(self, payload: bytes, what: str) -> list[bytes]:
        """Every rank's bytes, by rank (lengths first, then the payloads padded to the longest)."""
        lengths = self.exchange([len(payload)], what)[:, 0]
        longest = int(lengths.max())
        padded = np.zeros(max(longest, 1), np.uint8)
        padded[: len(payload)] = np.frombuffer(payload, np.uint8)
        rows = self._all_gather(padded.reshape(1, -1), what)
        return [rows[r, : int(lengths[r])].tobytes() for r in range(self.size)]

    def close(self) -> None:
        if self.bound is not None:
            self.bound.close()


def chunk_batches(shard_tokens: int, batch_size: int, context_size: int) -> int:
    """Batches per chunk: about one shard's rows, so chunks balance and shards stay near their size."""
    return max(1, math.ceil(shard_tokens / (batch_size * context_size)))


def owner(batch_index: int, chunk: int, world: int) -> int:
    return (batch_index // chunk) % world


def pack_rank(record: dict[str, Any], states: dict[str, NeuronStats]) -> bytes:
    """A rank's record and statistics states as bytes (an .npz: exact, no pickle)."""
    arrays: dict[str, np.ndarray] = {"record": np.frombuffer(json.dumps(record).encode(), np.uint8)}
    for i, state in enumerate(states.values()):
        arrays.update(state.arrays(prefix=f"{i}/"))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_rank(payload: bytes, hook_ids: list[str]) -> tuple[dict[str, Any], dict[str, NeuronStats]]:
    with np.load(io.BytesIO(payload)) as z:
        record = json.loads(z["record"].tobytes().decode())
        states = {h: NeuronStats.from_arrays(z, prefix=f"{i}/") for i, h in enumerate(hook_ids)}
    return record, states


def merge_ranks(manifest: dict[str, Any], parts: list[tuple[dict[str, Any], dict[str, NeuronStats]]]) -> dict[str, NeuronStats]:
    """Fill rank 0's `manifest` with every rank's shards (in corpus order) and timings; the merged states."""
    shards = sorted((s for record, _ in parts for s in record["shards"]), key=lambda s: tuple(s["first"]))
    manifest["shards"] = shards
    manifest["num_tokens"] = sum(s["rows"] for s in shards)
    manifest["ranks"] = [
        {"rank": r, "record": record["record"], "shards": len(record["shards"]), "rows": sum(s["rows"] for s in record["shards"]),
         "timings": record["timings"]}
        for r, (record, _) in enumerate(parts)
    ]
    timings = manifest["timings"]
    for key in ("compute_seconds", "stats_seconds", "write_seconds"):
        timings[key] = sum(record["timings"][key] for record, _ in parts)  # summed over ranks
    timings["elapsed_seconds"] = max(record["timings"]["elapsed_seconds"] for record, _ in parts)
    timings["tokens_per_second"] = manifest["num_tokens"] / timings["elapsed_seconds"] if timings["elapsed_seconds"] else None
    merged = {h: s.copy() for h, s in parts[0][1].items()}
    for _, states in parts[1:]:
        for h, s in states.items():
            merged[h].merge_in(s)
    return merged
