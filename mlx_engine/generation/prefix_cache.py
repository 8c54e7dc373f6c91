"""Recent prompts' KV caches, reused by a later prompt that starts with the same tokens.

Researchers re-run one prompt with different hooks or interventions, so the server keeps
the KV cache of each recent prompt (least recently used first out, bounded by bytes) and
a new prompt prefills only what follows the longest stored prefix it shares.

What may be reused is decided by the caller (generation/batch.py, `reusable_prefix`):
the stored KV must equal what this request would compute itself, so only caches of runs
without interventions are stored, and a request reuses one only when it has no
interventions and no capture asks for a position inside the reused prefix. The last
prompt token always runs: its logits choose the first token.

A sliding-window layer's RotatingKVCache keeps only the last positions of a long prompt
(at least `window - 1` of them, in temporal order after a prefill): a stored prefix
there is reusable down to the shortest prefix whose window it still holds, and a reused
one becomes a RotatingKVCache in the state a chunked prefill of that prefix leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache


@dataclass
class _Entry:
    model: Hashable
    tokens: np.ndarray
    layers: list[tuple[mx.array, mx.array]]  # per layer: keys, values [1, H, len(tokens) - first, D]
    nbytes: int
    rings: list[Optional[tuple[int, int]]]  # per layer: (max_size, first position held) of a rotating cache
    min_reuse: int  # the shortest prefix every layer still holds the window of


def _held(cache: Any, n: int) -> Optional[tuple[int, tuple[mx.array, mx.array], Optional[tuple[int, int]]]]:
    """(first position, its keys and values, ring) of a layer's cache after an n-token prefill; None if unusable."""
    if type(cache) is KVCache:
        return 0, (cache.keys[..., :n, :], cache.values[..., :n, :]), None
    if type(cache) is RotatingKVCache and cache.keep == 0 and cache.offset == n and cache._idx == cache.keys.shape[2]:
        held = cache.keys.shape[2]  # temporal order: positions [n - held, n)
        return n - held, (cache.keys, cache.values), (cache.max_size, n - held)
    return None


def _restore(keys: mx.array, values: mx.array, ring: Optional[tuple[int, int]], n: int) -> Any:
    """A fresh cache holding the stored layer up to position n (exclusive)."""
    if ring is None:
        c = KVCache()
        c.keys, c.values, c.offset = keys[..., :n, :], values[..., :n, :], n
        return c
    max_size, first = ring
    c = RotatingKVCache(max_size=max_size)
    c.keys, c.values = keys[..., : n - first, :], values[..., : n - first, :]
    c.offset, c._idx = n, n - first
    return c


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
            if n > best and n >= entry.min_reuse:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        entry = self._entries.pop(best_key)
        self._entries[best_key] = entry  # most recently used
        caches = [_restore(keys, values, ring, best) for (keys, values), ring in zip(entry.layers, entry.rings)]
        self.stats.hits += 1
        self.stats.cached_tokens += best
        return best, caches

    def store(self, model: Hashable, tokens: Sequence[int], caches: Sequence[Any]) -> None:
        """Keep positions [0, len(tokens)) of `caches` (one KVCache or RotatingKVCache per layer, after the prompt)."""
        n = len(tokens)
        query = np.asarray(tokens, dtype=np.int64)
        for key, entry in self._entries.items():
            if entry.model == model and np.array_equal(entry.tokens, query):
                self._entries.move_to_end(key)  # already stored: only its recency changes
                return
        held = [_held(c, n) for c in caches]
        if any(h is None for h in held):
            return
        layers = [(mx.contiguous(k), mx.contiguous(v)) for _, (k, v), _ in held]
        rings = [ring for _, _, ring in held]
        min_reuse = max([first + ring[0] - 1 for first, _, ring in held if ring is not None and first > 0], default=0)
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
        self._entries[self._next] = _Entry(model, query, layers, nbytes, rings, min_reuse)
        self._next += 1
        self.total_bytes += nbytes
        self.stats.stored += 1

    def forget(self, model: Hashable) -> None:
        """Drop every entry of `model` (it was unloaded)."""
        for key in [k for k, e in self._entries.items() if e.model == model]:
            self._drop(key)

    def _drop(self, key: int) -> None:
        self.total_bytes -= self._entries.pop(key).nbytes
