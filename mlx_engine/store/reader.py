"""`ActivationStore`: read a store's rows memory-mapped, its index, documents and statistics.

Only numpy is needed (datasets for `to_dataset`); no model, no MLX. Rows are a
`RowsView` over the shards' memory maps: slicing reads only the pages it touches, so a
store larger than memory is usable, and `iter_batches` streams shuffled batches for SAE
training with memory bounded by a few shards. An incomplete store (a run stopped or
still going) opens too and shows its committed shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from .errors import StoreError
from .manifest import DOCUMENTS, MANIFEST, read_manifest
from .shards import ShardMaps, ShardTensor, as_float
from .stats import NeuronStats


class RowsView:
    """Rows of one tensor across shards, as one array-like of shape [N, ...] (no copy until indexed).

    `view[i]`, `view[a:b]`, `view[array_of_rows]`, `view[rows, cols]` and `np.asarray(view)`
    return numpy arrays (bfloat16 widened to float32); `.parts[i]` is shard i's raw memory-mapped array.
    """

    def __init__(self, parts: ShardTensor, dtype: str) -> None:
        self.parts = parts
        self.stored_dtype = dtype
        # Each shard's rows come from the manifest: no shard is mapped to count them.
        self.offsets = np.cumsum([0] + list(parts.rows))
        tail = parts[0].shape[1:] if len(parts) else ()
        self.shape = (int(self.offsets[-1]), *tail)
        self.dtype = np.dtype(np.float32) if dtype == "bfloat16" else (parts[0].dtype if len(parts) else np.dtype(np.float32))

    def __len__(self) -> int:
        return self.shape[0]

    def _convert(self, array: np.ndarray) -> np.ndarray:
        return as_float(array, self.stored_dtype) if self.stored_dtype == "bfloat16" else np.array(array)

    def _slice(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        # Only the shards the range overlaps are read (and, lazily, mapped).
        first = max(0, int(np.searchsorted(self.offsets, start, side="right")) - 1)
        for i in range(first, len(self.parts)):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if self.offsets[i] >= stop:
                break
            if lo < hi:
                pieces.append(self.parts[i][lo - self.offsets[i] : hi - self.offsets[i]])
        if not pieces:
            return self._convert(np.empty((0, *self.shape[1:]), self.parts[0].dtype if len(self.parts) else np.float32))
        return self._convert(np.concatenate(pieces) if len(pieces) > 1 else pieces[0])

    def _take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for s in np.unique(shard):
            where = shard == s
            out[where] = self._convert(self.parts[s][rows[where] - self.offsets[s]])
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        cols = None
        if isinstance(key, tuple):
            key, cols = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            out = self._take(np.array([index]))[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = self._slice(start, stop) if step == 1 else self._take(np.arange(start, stop, step))
        else:
            out = self._take(np.asarray(key))
        return out[(slice(None), *cols)] if cols and out.ndim > 1 else (out[cols] if cols else out)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._slice(0, len(self))
        return out.astype(dtype) if dtype is not None else out

    def __repr__(self) -> str:
        return f"RowsView(shape={self.shape}, dtype={self.dtype}, shards={len(self.parts)})"


class ActivationStore:
    """An activation store folder, opened read-only (see store/layout.md for the layout)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._hooks = {h["hook_id"]: h for h in manifest["hooks"]}
        self._maps = ShardMaps([path / s["file"] for s in manifest["shards"]])  # mapped when read
        self._rows = [s["rows"] for s in manifest["shards"]]

    @classmethod
    def open(cls, path: Union[str, Path]) -> "ActivationStore":
        path = Path(path).expanduser()
        if not (path / MANIFEST).exists():
            raise StoreError(f"{path} is not an activation store: it has no {MANIFEST}.")
        return cls(path, read_manifest(path))

    @property
    def complete(self) -> bool:
        return self.manifest["status"] == "complete"

    @property
    def hooks(self) -> list[str]:
        return list(self._hooks)

    def hook_info(self, hook: str) -> dict[str, Any]:
        """The manifest's entry for a hook: layer, component, width, dtype, what a column means."""
        if hook not in self._hooks:
            raise StoreError(f"Hook {hook!r} is not in this store; it holds {', '.join(self._hooks)}.")
        return self._hooks[hook]

    @property
    def num_tokens(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def rows(self, hook: str) -> RowsView:
        info = self.hook_info(hook)
        return RowsView(ShardTensor(self._maps, hook, self._rows), info["dtype"])

    def tokens(self) -> RowsView:
        return RowsView(ShardTensor(self._maps, "tokens", self._rows), "int32")

    def index(self) -> tuple[RowsView, RowsView]:
        """(doc, pos) of every row: its document number and its position in that document."""
        return (RowsView(ShardTensor(self._maps, "doc", self._rows), "int64"),
                RowsView(ShardTensor(self._maps, "pos", self._rows), "int32"))

    def documents(self) -> Iterator[dict[str, Any]]:
        """Each stored document as {"doc", "source", "text"}, in order (streamed from documents.jsonl)."""
        limit = self.manifest["shards"][-1]["documents_bytes"] if self.manifest["shards"] else 0
        if self.complete:
            limit = self.manifest["documents"]["bytes"]
        with open(self.path / DOCUMENTS, "rb") as fh:
            while fh.tell() < limit:
                yield json.loads(fh.readline())

    def stats(self, hook: str) -> NeuronStats:
        """The hook's online statistics (all committed rows; mid-run, as of the last shard)."""
        info = self.hook_info(hook)
        stats = self.manifest["stats"]
        if self.complete:
            return NeuronStats.load(self.path / stats["files"][hook])
        if not stats.get("state"):
            raise StoreError(f"{self.path} has no complete shard yet, so no statistics.")
        with np.load(self.path / stats["state"]) as z:
            return NeuronStats.from_arrays(z, prefix=f"{info['file']}/")

    def row_of(self, doc: int, pos: int) -> int:
        """The row number holding (doc, pos); rows are stored in (doc, pos) order."""
        for i, s in enumerate(self.manifest["shards"]):
            if tuple(s["first"]) <= (doc, pos) <= tuple(s["last"]):
                docs, poss = self._maps[i]["doc"], self._maps[i]["pos"]
                lo, hi = np.searchsorted(docs, doc, "left"), np.searchsorted(docs, doc, "right")
                j = lo + int(np.searchsorted(poss[lo:hi], pos))
                if j < hi and poss[j] == pos:
                    return int(sum(x["rows"] for x in self.manifest["shards"][:i]) + j)
        raise KeyError(f"no row for document {doc} position {pos}")

    def top_examples(self, hook: str, neuron: int, k: Optional[int] = None, context: int = 8) -> list[dict[str, Any]]:
        """The neuron's k strongest activations (from the online top-k), each with its context.

        Each example has `value`, `doc`, `pos`, `row`, `token`, and Neuronpedia's fields over
        the stored rows of the same document within `context` positions: `tokens` (ids),
        `values`, `maxValue`, `maxValueTokenIndex` (the example's index in `tokens`).
        """
        state = self.stats(hook)
        if not 0 <= neuron < state.width:
            raise StoreError(f"neuron {neuron} is out of range: {hook} has {state.width} columns.")
        k = state.k if k is None else min(k, state.k)
        rows, tokens = self.rows(hook), self.tokens()
        docs, _ = self.index()
        out = []
        for rank in range(k):
            value, doc, pos = state.top_values[rank, neuron], int(state.top_doc[rank, neuron]), int(state.top_pos[rank, neuron])
            if doc < 0:
                break
            row = self.row_of(doc, pos)
            lo, hi = max(0, row - context), min(len(rows), row + context + 1)
            same = docs[lo:hi] == doc
            window = np.arange(lo, hi)[same]
            values = rows[window, neuron]
            out.append({
                "value": float(value), "doc": doc, "pos": pos, "row": row, "token": int(tokens[row]),
                "tokens": tokens[window].tolist(), "values": values.tolist(),
                "maxValue": float(value), "maxValueTokenIndex": int(np.nonzero(window == row)[0][0]),
            })
        return out

    def iter_batches(
        self, hook: str, batch_size: int, shuffle: bool = True, seed: int = 0, buffer_shards: int = 2, drop_last: bool = False
    ) -> Iterator[np.ndarray]:
        """Batches [batch_size, width] (float32 for bfloat16 stores) covering every row once.

        Shuffled as a block shuffle with bounded memory: the shard order is permuted, then
        `buffer_shards` shards at a time are read and their rows permuted together.
        """
        if batch_size < 1:
            raise StoreError(f"batch_size must be positive, got {batch_size}.")
        view = self.rows(hook)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(view.parts)) if shuffle else np.arange(len(view.parts))
        carry = np.empty((0, *view.shape[1:]), view.dtype)
        for g in range(0, len(order), max(1, buffer_shards)):
            group = [view._convert(view.parts[i]) for i in order[g : g + buffer_shards]]
            block = np.concatenate([carry, *group])
            if shuffle:
                block = block[rng.permutation(len(block))]
            full = len(block) - len(block) % batch_size
            for start in range(0, full, batch_size):
                yield block[start : start + batch_size]
            carry = block[full:]
        if len(carry) and not drop_last:
            yield carry

    def to_dataset(self, hooks: Optional[list[str]] = None) -> Any:
        """A datasets.Dataset with columns doc, pos, tokens and one per hook (a [width] list per row).

        Built on the shards' memory maps through Arrow without copying (bfloat16 is widened, a copy).
        """
        import datasets
        import pyarrow as pa
        from datasets.table import InMemoryTable

        tables = []
        for maps in self._maps:
            columns = {"doc": pa.array(maps["doc"]), "pos": pa.array(maps["pos"]), "tokens": pa.array(maps["tokens"])}
            for hook in hooks or self.hooks:
                info = self.hook_info(hook)
                flat = as_float(maps[hook], info["dtype"]).reshape(-1)
                columns[hook] = pa.FixedSizeListArray.from_arrays(pa.array(flat), info["width"])
            tables.append(pa.table(columns))
        if not tables:
            raise StoreError(f"{self.path} has no complete shard yet.")
        return datasets.Dataset(InMemoryTable(pa.concat_tables(tables)))

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, {self.num_tokens} tokens, hooks={self.hooks}, status={self.manifest['status']})"
