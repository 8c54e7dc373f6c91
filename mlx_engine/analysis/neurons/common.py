"""What the neuron analyses share: checks with clear errors, bounded reads of a store, token strings.

A store can be far larger than memory, so nothing here reads it whole. `iter_blocks`
streams rows in order, a block of `block_rows` rows at a time (the memory maps read only
the pages a block touches); `sample_rows` reads an evenly spaced subset bounded by a
number of elements (all rows when the store is small enough, so small stores are
analysed exactly). Neuron numbers are a hook's columns; `neuron_label` names the
model's own neuron where the hook stored a subset (`indices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from ...store.errors import StoreError
from ...store.reader import ActivationStore

BLOCK_ROWS = 1 << 15  # rows per streamed block
SAMPLE_ELEMENTS = 1 << 24  # elements (rows x columns, all hooks together) a bounded sample may hold


class NeuronError(ValueError):
    """A neuron analysis that cannot run as asked (missing hook, neuron out of range, no task labels)."""


def open_store(store: Union[ActivationStore, str, Path]) -> ActivationStore:
    """An opened store; a path that is not a store is a NeuronError naming it."""
    if isinstance(store, ActivationStore):
        return store
    try:
        return ActivationStore.open(store)
    except StoreError as exc:
        raise NeuronError(str(exc)) from None


def check_hooks(store: ActivationStore, hooks: Optional[Union[str, Sequence[str]]] = None) -> list[str]:
    """The hooks asked for (default: all the store holds), each checked to be in the store."""
    if hooks is None:
        return store.hooks
    asked = [hooks] if isinstance(hooks, str) else list(hooks)
    if not asked:
        raise NeuronError("no hooks given: name at least one of " + ", ".join(store.hooks))
    for hook in asked:
        if hook not in store.hooks:
            raise NeuronError(f"hook {hook!r} is not in the store {store.path}; it holds {', '.join(store.hooks)}.")
    if store.num_tokens == 0:
        raise NeuronError(f"the store {store.path} holds no rows yet.")
    return asked


def check_neurons(store: ActivationStore, hook: str, neurons: Union[int, Sequence[int]]) -> np.ndarray:
    """Neuron (column) numbers as an int array, each in range for the hook."""
    width = store.hook_info(check_hooks(store, hook)[0])["width"]
    values = np.atleast_1d(np.asarray(neurons))
    if values.size == 0 or values.dtype.kind not in "iu":
        raise NeuronError(f"neurons must be integers in 0..{width - 1}, got {neurons!r}.")
    bad = values[(values < 0) | (values >= width)]
    if bad.size:
        raise NeuronError(f"neuron {int(bad[0])} is out of range: {hook} has {width} neurons (0..{width - 1}).")
    return values.astype(np.int64)


def hook_layer(store: ActivationStore, hook: str) -> Optional[int]:
    layer = store.hook_info(hook).get("layer")
    return None if layer is None else int(layer)


def hook_name(store: ActivationStore, hook: str) -> str:
    """A short name for tables: "L3 mlp_post", or the hook id where it has no layer."""
    info = store.hook_info(hook)
    return hook if info.get("layer") is None else f"L{info['layer']} {info['component']}"


def neuron_label(store: ActivationStore, hook: str, column: int) -> int:
    """The model's neuron number of a column (the hook's `indices` where it stored a subset)."""
    indices = store.hook_info(hook).get("indices")
    return int(indices[column]) if indices else int(column)


@dataclass
class Block:
    """Rows [start, stop) of the store: tokens, (doc, pos), and each hook's values (float32)."""

    start: int
    stop: int
    tokens: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    values: dict[str, np.ndarray]


def iter_blocks(
    store: ActivationStore, hooks: Sequence[str], block_rows: int = BLOCK_ROWS, stop: Optional[int] = None,
) -> Iterator[Block]:
    """Every row in order (up to `stop`), `block_rows` at a time; memory is bounded by one block."""
    views = {h: store.rows(h) for h in hooks}
    tokens, (doc, pos) = store.tokens(), store.index()
    end = store.num_tokens if stop is None else min(stop, store.num_tokens)
    for start in range(0, end, block_rows):
        b = min(end, start + block_rows)
        yield Block(start, b, tokens[start:b], doc[start:b], pos[start:b],
                    {h: np.asarray(v[start:b], dtype=np.float32) for h, v in views.items()})


@dataclass
class Sample:
    """An evenly spaced subset of rows (all rows where they fit): row numbers, index, values per hook."""

    rows: np.ndarray
    tokens: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    values: dict[str, np.ndarray]
    total_rows: int

    @property
    def exact(self) -> bool:
        return len(self.rows) == self.total_rows


def sample_rows(
    store: ActivationStore, hooks: Sequence[str], max_elements: int = SAMPLE_ELEMENTS, max_rows: Optional[int] = None,
) -> Sample:
    """Rows spaced evenly over the store (np.linspace, rounded), at most max_elements values in all."""
    width = sum(store.hook_info(h)["width"] for h in hooks)
    n = store.num_tokens
    count = min(n, max(1, max_elements // max(width, 1)), max_rows or n)
    rows = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64)) if count < n else np.arange(n)
    doc, pos = store.index()
    return Sample(rows, store.tokens()[rows], doc[rows], pos[rows],
                  {h: np.asarray(store.rows(h)[rows], dtype=np.float32) for h in hooks}, n)


class TokenText:
    """Token ids as the strings a reader sees (each id decoded alone, special tokens kept).

    From a loaded model's tokenizer, or from the tokenizer.json of the model the manifest
    names when its files still hash to the manifest's record; otherwise ids show as "#id".
    """

    def __init__(self, store: ActivationStore, kit: Any = None) -> None:
        self._decode: Any = None
        self._cache: dict[int, str] = {}
        self.source = "token ids (the model's tokenizer was not found)"
        if kit is not None:
            self._decode = lambda i: kit.tokenizer.decode([i])
            self.source = f"the tokenizer of {kit.model_id}"
            return
        from ...store.manifest import sha256_files

        record = store.manifest.get("tokenizer", {})
        folder = Path(store.manifest.get("model", {}).get("path", ""))
        files = [folder / name for name in record.get("files", [])]
        if (folder / "tokenizer.json").exists() and all(f.exists() for f in files) and sha256_files(files) == record.get("sha256"):
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._decode = lambda i: tok.decode([i], skip_special_tokens=False)
            self.source = f"{folder / 'tokenizer.json'} (hash equal to the manifest's)"

    def __call__(self, ids: Union[int, Sequence[int], np.ndarray]) -> Any:
        if isinstance(ids, (int, np.integer)):
            return self.one(int(ids))
        return [self.one(int(i)) for i in np.asarray(ids).reshape(-1)]

    def one(self, i: int) -> str:
        if self._decode is None:
            return f"#{i}"
        if i not in self._cache:
            self._cache[i] = self._decode(i)
        return self._cache[i]

    def encode_ngram(self, store: ActivationStore, tokens: Union[str, int, Sequence[int]], kit: Any = None) -> tuple[int, ...]:
        """An n-gram as ids: ids as given, "#12 #40" as ids, or text through the tokenizer (no special tokens)."""
        if isinstance(tokens, (int, np.integer)):
            return (int(tokens),)
        if not isinstance(tokens, str):
            return tuple(int(t) for t in tokens)
        parts = tokens.split()
        if parts and all(p.startswith("#") and p[1:].isdigit() for p in parts):
            return tuple(int(p[1:]) for p in parts)
        if kit is not None:
            ids = kit.tokenizer.encode(tokens, add_special_tokens=False)
        else:
            folder = Path(store.manifest.get("model", {}).get("path", ""))
            if not (folder / "tokenizer.json").exists():
                raise NeuronError(f"cannot tokenize {tokens!r}: the model's tokenizer is not at {folder}; give token ids (#12).")
            from tokenizers import Tokenizer

            ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(tokens, add_special_tokens=False).ids
        if not ids:
            raise NeuronError(f"{tokens!r} encodes to no tokens.")
        return tuple(int(i) for i in ids)


def rows_of(store: ActivationStore, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Row numbers of many (doc, pos) pairs at once (-1 where absent), one shard's index at a time."""
    doc, pos = np.asarray(doc, np.int64).reshape(-1), np.asarray(pos, np.int64).reshape(-1)
    want = doc * (1 << 32) + pos
    out = np.full(len(want), -1, np.int64)
    docs, poss = store.index()
    for part_doc, part_pos, offset in zip(docs.parts, poss.parts, docs.offsets):
        keys = np.asarray(part_doc, np.int64) * (1 << 32) + np.asarray(part_pos, np.int64)
        if not len(keys):
            continue
        at = np.clip(np.searchsorted(keys, want), 0, len(keys) - 1)
        found = (keys[at] == want) & (out < 0)
        out[found] = at[found] + offset
    return out
