"""Polysemantic neurons: how many distinct kinds of context a neuron's strongest activations fall into.

For each neuron, its top-k examples (the store's online top-k) are represented by the
hook's whole activation vector at each example's row (the model's own representation of
that context at this layer) and clustered by scikit-learn's AgglomerativeClustering
(average linkage, cosine distance, cut at `distance`: two examples share a cluster when
their clusters' mean cosine distance is below it). The score is that number of clusters;
the second measure is the normalised entropy of the examples' tokens,
H(token counts) / log(number of examples) (scipy.stats.entropy; 0: one token, 1: all
different). Neurons rank per hook by clusters, then token entropy. A neuron with a single
cluster and one token is monosemantic by both measures; one whose examples split into many
clusters over many tokens is a candidate for polysemanticity (Elhage et al. 2022).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import scipy.stats
from sklearn.cluster import AgglomerativeClustering

from ...store.reader import ActivationStore
from .common import NeuronError, TokenText, check_hooks, check_neurons, hook_layer, rows_of


def cluster_contexts(vectors: np.ndarray, distance: float) -> np.ndarray:
    """Cluster labels of context vectors [k, width] (k >= 2): average-linkage agglomerative, cosine."""
    model = AgglomerativeClustering(n_clusters=None, distance_threshold=distance, metric="cosine", linkage="average")
    return model.fit_predict(vectors)


def token_entropy(tokens: Sequence[int]) -> float:
    """H(token counts) / log(len(tokens)); 0 for fewer than two tokens."""
    if len(tokens) < 2:
        return 0.0
    _, counts = np.unique(np.asarray(tokens), return_counts=True)
    return float(min(1.0, scipy.stats.entropy(counts) / np.log(len(tokens))))


def polysemanticity(
    store: ActivationStore, hook: str, neurons: Optional[Sequence[int]] = None, k: Optional[int] = None,
    distance: float = 0.5, text: Optional[TokenText] = None,
) -> list[dict[str, Any]]:
    """Every neuron's score (default: all of the hook's), ranked, each cluster with its examples (JSON-ready)."""
    check_hooks(store, hook)
    if not 0.0 < distance <= 2.0:
        raise NeuronError(f"distance is a cosine distance in (0, 2], got {distance}.")
    state = store.stats(hook)
    columns = np.arange(state.width) if neurons is None else check_neurons(store, hook, neurons)
    k = state.k if k is None else min(int(k), state.k)
    text = text or TokenText(store)
    docs, poss = state.top_doc[:k, columns], state.top_pos[:k, columns]
    rows = rows_of(store, docs, poss).reshape(docs.shape)
    rows[docs < 0] = -1
    needed = np.unique(rows[rows >= 0])
    vectors = np.asarray(store.rows(hook)[needed], np.float64) if len(needed) else np.empty((0, state.width))
    tokens = store.tokens()[needed] if len(needed) else np.empty(0, np.int64)
    where = {int(r): i for i, r in enumerate(needed)}
    out = []
    for j, column in enumerate(columns):
        mine = [int(r) for r in rows[:, j] if r >= 0]
        idx = [where[r] for r in mine]
        labels = cluster_contexts(vectors[idx], distance) if len(idx) >= 2 else np.zeros(len(idx), np.int64)
        ids = tokens[idx].tolist()
        clusters = []
        for c in range(int(labels.max()) + 1 if len(labels) else 0):
            members = [m for m, label in enumerate(labels) if label == c]
            clusters.append({"size": len(members), "examples": [
                {"row": mine[m], "doc": int(docs[m, j]), "pos": int(poss[m, j]), "token_id": ids[m], "token": text.one(ids[m]),
                 "value": float(state.top_values[m, column])} for m in members]})
        clusters.sort(key=lambda c: (-c["size"], c["examples"][0]["row"]))
        out.append({"hook_id": hook, "layer": hook_layer(store, hook), "neuron": int(column), "examples": len(idx),
                    "clusters": len(clusters), "token_entropy": token_entropy(ids), "distinct_tokens": len(set(ids)),
                    "cluster_examples": clusters})
    out.sort(key=lambda r: (-r["clusters"], -r["token_entropy"], r["neuron"]))
    for rank, r in enumerate(out):
        r["rank"] = rank
    return out
