"""Recent prompts' KV caches, reused by a later prompt that starts with the same tokens.

Researchers re-run one prompt with different hooks or interventions, so the server keeps
the KV cache of each recent prompt (least recently used first out, bounded by bytes) and
a new prompt prefills only what follows the longest stored prefix it shares.

What may be reused is decided by the caller (generation/batch.py, `reusable_prefix`):
the stored KV must equal what this request would compute itself, so only caches of runs
without interventions are stored, and a request reuses one only when it has no
interventions and no capture asks for a position inside the reused prefix. The last
prompt token always runs: its logits choose the first token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache


@dataclass
class _Entry:
    model: Hashable
    tokens: np.ndarray
    layers: list[tuple[mx.array, mx.array]]  # per layer: keys, values [1, H, len(tokens), D]
    nbytes: int


@dataclass
class PrefixStats:
    hits: int = 0
    cached_tokens: int = 0  # prompt tokens served from the cache, summed over hits
    stored: int = 0
    evicted: int = 0


class PrefixCache:
    """KV caches of recent prompts per model, LRU, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the prompt cache needs a positive size in bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self._next = 0
        self.total_bytes = 0
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, model: Hashable, tokens: Sequence[int], limit: int) -> tuple[int, Optional[list[Any]]]:
        """(n, caches): a fresh KVCache per layer holding positions [0, n) of the longest stored
        prefix shared with `tokens`, n <= limit; (0, None) when nothing is shared."""
        if limit <= 0:
            return 0, None
        query = np.asarray(tokens, dtype=np.int64)
        best, best_key = 0, None
        for key, entry in self._entries.items():
            if entry.model != model:
                continue
            m = min(len(entry.tokens), len(query), limit)
            same = np.flatnonzero(entry.tokens[:m] != query[:m])
            n = int(same[0]) if same.size else m
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        entry = self._entries.pop(best_key)
        self._entries[best_key] = entry  # most recently used
        caches = []
        for keys, values in entry.layers:
            c = KVCache()
            c.keys, c.values, c.offset = keys[..., :best, :], values[..., :best, :], best
            caches.append(c)
        self.stats.hits += 1
        self.stats.cached_tokens += best
        return best, caches

    def store(self, model: Hashable, tokens: Sequence[int], caches: Sequence[Any]) -> None:
        """Keep positions [0, len(tokens)) of `caches` (one KVCache per layer, after the prompt)."""
        n = len(tokens)
        query = np.asarray(tokens, dtype=np.int64)
        for key, entry in self._entries.items():
            if entry.model == model and np.array_equal(entry.tokens, query):
                self._entries.move_to_end(key)  # already stored: only its recency changes
                return
        layers = [(mx.contiguous(c.keys[..., :n, :]), mx.contiguous(c.values[..., :n, :])) for c in caches]
        mx.eval(layers)
        nbytes = sum(k.nbytes + v.nbytes for k, v in layers)
        if nbytes > self.max_bytes:
            return
        # A stored prompt that this one extends (or repeats) is superseded by it.
        for key in [k for k, e in self._entries.items() if e.model == model and len(e.tokens) <= n and np.array_equal(e.tokens, query[: len(e.tokens)])]:
            self._drop(key)
        while self._entries and self.total_bytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.evicted += 1
        self._entries[self._next] = _Entry(model, query, layers, nbytes)
        self._next += 1
        self.total_bytes += nbytes
        self.stats.stored += 1

    def forget(self, model: Hashable) -> None:
        """Drop every entry of `model` (it was unloaded)."""
        for key in [k for k, e in self._entries.items() if e.model == model]:
            self._drop(key)

    def _drop(self, key: int) -> None:
        self.total_bytes -= self._entries.pop(key).nbytes
