"""Neurons clustered by co-activation: who fires together over the same tokens.

Co-activation of two neurons is the Pearson correlation of their values over the sampled
tokens (np.corrcoef; a constant neuron correlates 0 with every other). Each neuron is
described by its row of that matrix (its correlation profile) or by the distance
1 - r, and clustered with scikit-learn:

  kmeans         KMeans on the correlation profiles (k-means++ initialisation, n_init=10)
  agglomerative  AgglomerativeClustering on 1 - r, precomputed, average linkage
  dbscan         DBSCAN on 1 - r, precomputed (label -1: noise, in no cluster)

Quality is the silhouette score on 1 - r (sklearn.metrics.silhouette_score, precomputed;
Rousseeuw 1987), defined when there are 2..n-1 clusters. Neurons of several hooks cluster
together (their rows are the same tokens), each keeping its hook's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans
from sklearn.metrics import silhouette_score

from ...store.reader import ActivationStore
from .common import SAMPLE_ELEMENTS, NeuronError, Sample, check_hooks, check_neurons, hook_layer, sample_rows

METHODS = ("kmeans", "agglomerative", "dbscan")


def coactivation(x: np.ndarray) -> np.ndarray:
    """Pearson correlation [width, width] of the columns of x [tokens, width]; constant columns get 0 off the diagonal."""
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.corrcoef(np.asarray(x, np.float64), rowvar=False)
    corr = np.nan_to_num(np.atleast_2d(corr), nan=0.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def cluster_columns(
    x: np.ndarray, method: str = "kmeans", n_clusters: int = 8, eps: float = 0.5, min_samples: int = 3, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label per column, the co-activation matrix) of x [tokens, width] by `method`."""
    if method not in METHODS:
        raise NeuronError(f"unknown clustering method {method!r}; choose one of {', '.join(METHODS)}.")
    corr = coactivation(x)
    width = corr.shape[0]
    distance = np.clip(1.0 - corr, 0.0, 2.0)
    if method == "dbscan":
        labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distance)
        return labels, corr
    if not 1 <= n_clusters <= width:
        raise NeuronError(f"n_clusters must be in 1..{width} (the number of neurons), got {n_clusters}.")
    if method == "kmeans":
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(corr)
    else:
        labels = AgglomerativeClustering(n_clusters=n_clusters, metric="precomputed", linkage="average").fit_predict(distance)
    return labels, corr


def silhouette(corr: np.ndarray, labels: np.ndarray) -> Optional[float]:
    keep = labels >= 0
    found = len(set(labels[keep].tolist()))
    if not 2 <= found <= keep.sum() - 1:
        return None
    distance = np.clip(1.0 - corr[np.ix_(keep, keep)], 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    return float(silhouette_score(distance, labels[keep], metric="precomputed"))


@dataclass
class NeuronClusters:
    """Cluster labels of the neurons of one or more hooks, with the co-activation they came from."""

    method: str
    hooks: list[str]
    hook_of: list[str]  # per clustered neuron
    neuron_of: np.ndarray
    labels: np.ndarray
    coactivation: np.ndarray
    silhouette: Optional[float]
    sample_rows: int
    params: dict[str, Any]

    @property
    def order(self) -> np.ndarray:
        """Neurons sorted by cluster (noise last), then by hook and number: the figure's axis order."""
        key = np.where(self.labels < 0, self.labels.max() + 1, self.labels)
        return np.lexsort((self.neuron_of, key))

    def clusters(self) -> list[dict[str, Any]]:
        out = []
        for c in sorted(set(self.labels.tolist())):
            members = np.nonzero(self.labels == c)[0]
            inside = self.coactivation[np.ix_(members, members)]
            mean_r = float((inside.sum() - len(members)) / max(len(members) * (len(members) - 1), 1))
            out.append({"cluster": int(c), "size": len(members), "mean_coactivation": mean_r,
                        "neurons": [{"hook_id": self.hook_of[m], "neuron": int(self.neuron_of[m])} for m in members]})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "hooks": self.hooks, "sample_rows": self.sample_rows, "params": self.params,
                "silhouette": self.silhouette, "labels": self.labels.tolist(), "hook_of": self.hook_of,
                "neuron_of": self.neuron_of.tolist(), "clusters": self.clusters()}


def cluster_neurons(
    store: ActivationStore, hooks: Sequence[str], method: str = "kmeans", n_clusters: int = 8, eps: float = 0.5,
    min_samples: int = 3, seed: int = 0, max_elements: int = SAMPLE_ELEMENTS, sample: Optional[Sample] = None,
    neurons: Optional[dict[str, Sequence[int]]] = None,
) -> NeuronClusters:
    """Cluster the neurons of `hooks` (or of each hook only `neurons[hook]`) by co-activation over a bounded sample."""
    hooks = check_hooks(store, hooks)
    if sample is None or not all(h in sample.values for h in hooks):
        sample = sample_rows(store, hooks, max_elements)
    chosen = {h: np.arange(sample.values[h].shape[1]) if not neurons or h not in neurons else check_neurons(store, h, neurons[h])
              for h in hooks}
    x = np.concatenate([sample.values[h][:, chosen[h]] for h in hooks], axis=1)
    labels, corr = cluster_columns(x, method, min(n_clusters, x.shape[1]), eps, min_samples, seed)
    hook_of = [h for h in hooks for _ in chosen[h]]
    neuron_of = np.concatenate([chosen[h] for h in hooks])
    params = {"n_clusters": n_clusters, "eps": eps, "min_samples": min_samples, "seed": seed,
              "layers": [hook_layer(store, h) for h in hooks]}
    return NeuronClusters(method, list(hooks), hook_of, neuron_of, labels, corr, silhouette(corr, labels), len(sample.rows), params)
