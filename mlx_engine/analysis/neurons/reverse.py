"""Reverse queries: which tokens and n-grams activate a neuron, and which neurons a token or n-gram activates.

An occurrence of an n-gram is a row whose own token ends it: the n tokens of rows
r-n+1..r, all in one document at consecutive positions. A neuron's activation at that
occurrence is its value at row r (the model has read the whole n-gram there). One
streaming pass per hook: each block's n-grams (numpy's sliding_window_view over the
tokens, with n-1 rows carried from the block before) are grouped by np.unique(axis=0),
and their values summed with a sparse one-hot matrix product (scipy.sparse), so memory is
the block plus one line per distinct n-gram seen. Rankings are by mean activation over
the occurrences (ties: more occurrences first, then the smaller ids), among n-grams seen
at least `min_count` times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import scipy.sparse

from ...store.reader import ActivationStore
from .common import BLOCK_ROWS, NeuronError, TokenText, check_hooks, check_neurons, hook_layer, hook_name

Ngram = Union[str, int, Sequence[int]]


def ngram_ends(tokens: np.ndarray, doc: np.ndarray, pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(index of each row that ends an n-gram, the n-grams [m, n]) over arrays that hold n-1 rows of lead-in."""
    if len(tokens) < n:
        return np.empty(0, np.int64), np.empty((0, n), np.int64)
    grams = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, np.int64), n)
    docs = np.lib.stride_tricks.sliding_window_view(np.asarray(doc), n)
    steps = np.lib.stride_tricks.sliding_window_view(np.asarray(pos, np.int64), n)
    ok = (docs == docs[:, :1]).all(axis=1) & (np.diff(steps, axis=1) == 1).all(axis=1)
    return np.nonzero(ok)[0] + n - 1, grams[ok]


def _group(keys: np.ndarray, values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `keys` made unique, their `counts` and `values` summed (sparse one-hot product)."""
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    onehot = scipy.sparse.csr_matrix((np.ones(len(inverse)), (inverse, np.arange(len(inverse)))), shape=(len(unique), len(inverse)))
    return unique, onehot @ values, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)


@dataclass
class NgramTable:
    """Every n-gram seen, its occurrence count, and the chosen neurons' summed activation there."""

    hook: str
    n: int
    neurons: np.ndarray  # [m] columns
    keys: np.ndarray  # [K, n] token ids
    counts: np.ndarray  # [K]
    sums: np.ndarray  # [K, m]

    @property
    def means(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1)[:, None]

    def top_ngrams(self, neuron: int, top: int = 10, min_count: int = 1, text: Optional[TokenText] = None) -> list[dict[str, Any]]:
        """The n-grams with the largest mean activation of `neuron` (seen at least min_count times)."""
        where = np.nonzero(self.neurons == neuron)[0]
        if not where.size:
            raise NeuronError(f"neuron {neuron} is not in this table (it holds {self.neurons.tolist()}).")
        means = self.means[:, where[0]]
        keep = np.nonzero(self.counts >= min_count)[0]
        order = keep[np.lexsort((*self.keys[keep].T[::-1], -self.counts[keep], -means[keep]))][:top]
        return [{"ngram": self.keys[i].tolist(), "text": text(self.keys[i]) if text else None, "count": int(self.counts[i]),
                 "mean": float(means[i])} for i in order]


def ngram_table(
    store: ActivationStore, hook: str, n: int = 1, neurons: Optional[Sequence[int]] = None, block_rows: int = BLOCK_ROWS,
) -> NgramTable:
    """The n-gram table of `hook` for `neurons` (default: every neuron) in one streaming pass."""
    info = store.hook_info(check_hooks(store, hook)[0])
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise NeuronError(f"n (the n-gram length) must be a positive integer, got {n!r}.")
    columns = np.arange(info["width"]) if neurons is None else check_neurons(store, hook, neurons)
    view, tokens, (doc, pos) = store.rows(hook), store.tokens(), store.index()
    keys, sums, counts = np.empty((0, n), np.int64), np.empty((0, len(columns))), np.empty(0, np.int64)
    for start in range(0, store.num_tokens, block_rows):
        stop = min(store.num_tokens, start + block_rows)
        lead = max(0, start - (n - 1))
        ends, grams = ngram_ends(tokens[lead:stop], doc[lead:stop], pos[lead:stop], n)
        mine = ends + lead >= start  # the lead-in rows' n-grams belong to the block before
        ends, grams = ends[mine], grams[mine]
        if not len(ends):
            continue
        values = view[start:stop][:, columns].astype(np.float64)[ends + lead - start]
        keys, sums, counts = _group(np.concatenate([keys, grams]), np.concatenate([sums, values]),
                                    np.concatenate([counts, np.ones(len(ends), np.int64)]))
    return NgramTable(hook, n, columns, keys, counts, np.asarray(sums))


def neuron_ngrams(
    store: ActivationStore, hook: str, neurons: Union[int, Sequence[int]], n: Sequence[int] = (1, 2, 3), top: int = 10,
    min_count: int = 2, text: Optional[TokenText] = None,
) -> dict[int, dict[int, list[dict[str, Any]]]]:
    """For each neuron, for each n in `n`: its top n-grams by mean activation (JSON-ready)."""
    columns = check_neurons(store, hook, neurons)
    text = text or TokenText(store)
    tables = {k: ngram_table(store, hook, k, columns) for k in n}
    return {int(c): {k: t.top_ngrams(int(c), top, min_count if k > 1 else 1, text) for k, t in tables.items()} for c in columns}


def token_neurons(
    store: ActivationStore, ngram: Ngram, hooks: Optional[Sequence[str]] = None, top: int = 10, kit: Any = None,
    block_rows: int = BLOCK_ROWS,
) -> dict[str, Any]:
    """The neurons a token or n-gram activates most, per hook: mean activation over its occurrences.

    `ngram`: token ids, "#12 #40", or text (tokenized without special tokens). Each neuron
    also gets its z-score there, (mean at the n-gram - overall mean) / overall std (online).
    """
    hooks = check_hooks(store, hooks)
    text = TokenText(store, kit)
    key = text.encode_ngram(store, ngram, kit)
    n = len(key)
    tokens, (doc, pos) = store.tokens(), store.index()
    sums = {h: np.zeros(store.hook_info(h)["width"]) for h in hooks}
    count = 0
    for start in range(0, store.num_tokens, block_rows):
        stop = min(store.num_tokens, start + block_rows)
        lead = max(0, start - (n - 1))
        ends, grams = ngram_ends(tokens[lead:stop], doc[lead:stop], pos[lead:stop], n)
        rows = ends[(grams == np.asarray(key)).all(axis=1) & (ends + lead >= start)] + lead
        if not len(rows):
            continue
        count += len(rows)
        for h in hooks:
            sums[h] += np.asarray(store.rows(h)[rows], np.float64).sum(axis=0)
    out: dict[str, Any] = {"ngram": list(key), "text": text(key), "count": count, "hooks": {}}
    if count == 0:
        return out
    for h in hooks:
        state = store.stats(h)
        mean = sums[h] / count
        with np.errstate(divide="ignore", invalid="ignore"):
            zscore = np.where(state.std > 0, (mean - state.mean) / state.std, 0.0)
        order = np.lexsort((np.arange(len(mean)), -mean))[:top]
        out["hooks"][h] = {"layer": hook_layer(store, h), "name": hook_name(store, h), "neurons": [
            {"neuron": int(i), "mean": float(mean[i]), "zscore": float(zscore[i]), "overall_mean": float(state.mean[i])} for i in order]}
    return out
