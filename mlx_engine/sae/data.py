"""Training rows: a store's hooks (or in-memory arrays), split into training and held-out rows, and
streamed as shuffled batches with bounded memory.

The shuffle is a block shuffle over row indices: each epoch permutes blocks of `block` rows,
then `buffer` blocks at a time are joined and their rows permuted (rng seeded by (seed, epoch)).
Only the batch's own rows are ever read (sorted, from the memory maps), so memory is one
batch whatever the store's size; several hooks (a transcoder's input and target) read the
same indices, so their rows stay aligned. The stream is a pure function of (seed, step):
resuming at step s replays the index permutations up to s without reading any rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from ..store.errors import StoreError
from ..store.reader import ActivationStore
from .model import SAEError

Data = Union[str, Path, ActivationStore, np.ndarray]


@dataclass
class Source:
    """Where training rows come from: one view per hook (input first), the split, and the store."""

    views: list[Any]  # RowsView or ndarray, [N, width] each
    names: list[str]  # hook ids (input, then target)
    n_train: int
    n_rows: int
    store: Optional[ActivationStore] = None

    @property
    def widths(self) -> list[int]:
        return [int(v.shape[1]) for v in self.views]

    def heldout(self) -> list[np.ndarray]:
        return [np.asarray(v[self.n_train : self.n_rows], dtype=np.float32) for v in self.views]

    def identity(self) -> dict[str, Any]:
        """What names the data for the resume check (store fingerprint, or the arrays' bytes)."""
        if self.store is not None:
            return {"store": self.store.manifest.get("fingerprint"), "rows": self.n_rows, "hooks": self.names}
        import hashlib

        digest = hashlib.sha256()
        for v in self.views:
            digest.update(np.ascontiguousarray(v).tobytes())
        return {"arrays_sha256": digest.hexdigest(), "rows": self.n_rows, "hooks": self.names}


def _document_split(store: ActivationStore, n: int, eval_tokens: int) -> int:
    """The first held-out row: the start of the document holding row n - eval_tokens (rows are in
    (doc, pos) order), or that row itself when one document fills the store."""
    if eval_tokens <= 0:
        return n
    cut = max(0, n - eval_tokens)
    docs, _ = store.index()
    doc = int(docs[cut])
    lo, hi = 0, cut  # first row of `doc`: binary search on the sorted doc column
    while lo < hi:
        mid = (lo + hi) // 2
        if int(docs[mid]) < doc:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo > 0 else cut


def open_source(data: Data, hook: Optional[str], target_hook: Optional[str], eval_tokens: int,
                target: Optional[np.ndarray] = None) -> Source:
    """The rows to train on: a store (path or opened) and its hook(s), or arrays [N, d_in] (and `target`)."""
    if isinstance(data, np.ndarray) or isinstance(target, np.ndarray):
        arrays = [np.asarray(data, dtype=np.float32)] + ([np.asarray(target, dtype=np.float32)] if target is not None else [])
        if any(a.ndim != 2 for a in arrays):
            raise SAEError(f"training arrays must be [rows, width], got shapes {[list(a.shape) for a in arrays]}.")
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise SAEError(f"input and target arrays must have the same rows, got {[len(a) for a in arrays]}.")
        names = [hook or "input"] + ([target_hook or "target"] if target is not None else [])
        return Source(arrays, names, max(0, n - eval_tokens) if eval_tokens < n else n, n)
    store = data if isinstance(data, ActivationStore) else ActivationStore.open(data)
    if hook is None:
        raise SAEError(f"name the hook to train on; {store.path} holds {', '.join(store.hooks)}.")
    names = [hook] + ([target_hook] if target_hook else [])
    for name in names:
        if name not in store.hooks:
            raise StoreError(f"Hook {name!r} is not in the store {store.path}; it holds {', '.join(store.hooks)}.")
    views = [store.rows(name) for name in names]
    if any(len(v.shape) != 2 for v in views):
        raise SAEError(f"hooks {names} are not [rows, width] in {store.path}.")
    n = store.num_tokens
    if n == 0:
        raise StoreError(f"{store.path} has no rows yet.")
    split = _document_split(store, n, min(eval_tokens, n // 2))
    return Source(views, names, split, n, store)


class BatchStream:
    """Shuffled batches of the training rows [0, n_train), the same for every view (see the module docstring)."""

    def __init__(self, source: Source, batch_size: int, seed: int, block: int, buffer: int) -> None:
        if source.n_train < batch_size:
            raise SAEError(f"{source.n_train} training rows are fewer than one batch of {batch_size}; lower batch_size.")
        self.source, self.batch_size, self.seed, self.block, self.buffer = source, batch_size, seed, block, buffer
        self.steps_per_epoch = source.n_train // batch_size

    def _epoch_indices(self, epoch: int) -> Iterator[np.ndarray]:
        """Each batch's row indices for one epoch (the remainder that fills no batch is dropped)."""
        n = self.source.n_train
        rng = np.random.default_rng([self.seed, epoch])
        starts = np.arange(0, n, self.block)[rng.permutation(-(-n // self.block))]
        carry = np.empty(0, np.int64)
        for g in range(0, len(starts), self.buffer):
            rows = [np.arange(s, min(s + self.block, n)) for s in starts[g : g + self.buffer]]
            pool = np.concatenate([carry, *rows])
            pool = pool[rng.permutation(len(pool))]
            full = len(pool) - len(pool) % self.batch_size
            for i in range(0, full, self.batch_size):
                yield pool[i : i + self.batch_size]
            carry = pool[full:]

    def read(self, idx: np.ndarray) -> list[np.ndarray]:
        """The rows `idx` of every view, in the order given (read sorted, for the memory maps)."""
        order = np.argsort(idx, kind="stable")
        out = []
        for view in self.source.views:
            rows = np.asarray(view[idx[order]], dtype=np.float32)
            batch = np.empty_like(rows)
            batch[order] = rows
            out.append(batch)
        return out

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(step, rows of each view) from `start_step` on, endlessly (epoch after epoch)."""
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        step = start_step - skip
        while True:
            for idx in self._epoch_indices(epoch):
                if step >= start_step:
                    yield step, self.read(idx)
                step += 1
            epoch += 1


def sample_rows(source: Source, count: int, seed: int) -> list[np.ndarray]:
    """`count` training rows drawn without replacement (for b_dec and the normalisation constant)."""
    rng = np.random.default_rng([seed, 7])
    count = min(count, source.n_train)
    idx = np.sort(rng.choice(source.n_train, size=count, replace=False))
    return [np.asarray(v[idx], dtype=np.float32) for v in source.views]


def heldout_windows(source: Source, limit: int) -> list[list[int]]:
    """Token windows of the held-out rows (a new window where the document or the extraction window
    changes), for the downstream CE; empty without a store."""
    store = source.store
    if store is None or limit <= 0 or source.n_train >= source.n_rows:
        return []
    lo, hi = source.n_train, source.n_rows
    tokens = np.asarray(store.tokens()[lo:hi])
    docs, poss = (np.asarray(v[lo:hi]) for v in store.index())
    context = int(store.manifest.get("context_size") or 1 << 30)
    breaks = (np.diff(docs) != 0) | (np.diff(poss) != 1) | (poss[1:] % context == 0)
    bounds = [0, *(np.nonzero(breaks)[0] + 1).tolist(), len(tokens)]
    windows = [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= 2]
    return windows[:limit]
