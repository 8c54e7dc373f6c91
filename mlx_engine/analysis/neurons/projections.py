"""Token positions projected to 2-D, and how layers relate: PCA spectra, neuron correlations, linear CKA.

Projections (of a bounded, evenly spaced sample of rows; several hooks of one width are
stacked, so the points can be coloured by layer): PCA (scikit-learn, with its explained
variance ratio), t-SNE (sklearn.manifold.TSNE, PCA initialisation; van der Maaten &
Hinton 2008) and UMAP (umap-learn; McInnes et al. 2018), each point carrying its layer,
token, document, position and, if asked, one neuron's value, so a figure can colour by any.

A hook's PCA spectrum also gives its dimensionality, the participation ratio of the
covariance eigenvalues (sum l)^2 / sum l^2 (Gao et al. 2017).

Cross-layer: Pearson (np.corrcoef) or Spearman (scipy.stats.spearmanr) correlation of
every neuron of one hook with every neuron of another over the same rows, and linear CKA
between hooks (Kornblith et al. 2019, eq. for the linear kernel on centred features):
CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); it is invariant to rotation and
isotropic scaling, and 1 for X against itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import scipy.stats
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from ...store.reader import ActivationStore
from .common import SAMPLE_ELEMENTS, NeuronError, Sample, TokenText, check_hooks, check_neurons, hook_layer, sample_rows

METHODS = ("pca", "tsne", "umap")


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def embed(x: np.ndarray, method: str, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """2-D coordinates of the rows of x by PCA, t-SNE or UMAP, and what the method reports."""
    if method not in METHODS:
        raise NeuronError(f"unknown projection {method!r}; choose one of {', '.join(METHODS)}.")
    if len(x) < 3:
        raise NeuronError(f"a projection needs at least 3 points, got {len(x)}.")
    x = np.asarray(x, np.float64)
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed)
        return pca.fit_transform(x), {"explained_variance_ratio": pca.explained_variance_ratio_.tolist()}
    if method == "tsne":
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method="exact" if len(x) <= 600 else "barnes_hut").fit_transform(x)
        return coords, {"perplexity": perplexity}
    if not umap_available():
        raise NeuronError("UMAP needs the umap-learn package (pip install umap-learn); PCA and t-SNE work without it.")
    import umap

    neighbours = int(min(15, len(x) - 1))
    coords = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed, n_jobs=1).fit_transform(x)
    return np.asarray(coords, np.float64), {"n_neighbors": neighbours}


@dataclass
class Projection:
    """Points in 2-D, each a (hook, row) with what a figure may colour it by."""

    method: str
    coords: np.ndarray  # [P, 2]
    hook: list[str]
    layer: list[Optional[int]]
    row: np.ndarray
    token_id: np.ndarray
    token: list[str]
    doc: np.ndarray
    pos: np.ndarray
    value: Optional[np.ndarray]  # the chosen neuron's value at each point
    neuron: Optional[int]
    info: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "info": self.info, "neuron": self.neuron, "points": [
            {"x": float(self.coords[i, 0]), "y": float(self.coords[i, 1]), "hook_id": self.hook[i], "layer": self.layer[i],
             "row": int(self.row[i]), "token_id": int(self.token_id[i]), "token": self.token[i], "doc": int(self.doc[i]),
             "pos": int(self.pos[i]), "value": None if self.value is None else float(self.value[i])} for i in range(len(self.row))]}


def project_positions(
    store: ActivationStore, hooks: Sequence[str], method: str = "pca", points: int = 1000, neuron: Optional[int] = None,
    seed: int = 0, text: Optional[TokenText] = None,
) -> Projection:
    """Project up to `points` sampled rows (shared among the hooks, which must have one width) to 2-D.

    The sample also holds at most SAMPLE_ELEMENTS values (64 MiB of float32), which bounds memory for wide
    hooks: `info["points_per_hook"]` says how many rows were projected.
    """
    hooks = check_hooks(store, hooks)
    widths = {store.hook_info(h)["width"] for h in hooks}
    if len(widths) != 1:
        raise NeuronError(f"hooks projected together need one width; {', '.join(hooks)} have widths {sorted(widths)}.")
    if neuron is not None:
        neuron = int(check_neurons(store, hooks[0], neuron)[0])
    sample = sample_rows(store, hooks, max_rows=max(1, points // len(hooks)))
    x = np.concatenate([sample.values[h] for h in hooks])
    coords, info = embed(x, method, seed)
    text = text or TokenText(store)
    rep = len(hooks)
    token_id = np.tile(sample.tokens, rep)
    return Projection(method, coords, [h for h in hooks for _ in sample.rows], [hook_layer(store, h) for h in hooks for _ in sample.rows],
                      np.tile(sample.rows, rep), token_id, text(token_id), np.tile(sample.doc, rep), np.tile(sample.pos, rep),
                      None if neuron is None else x[:, neuron].astype(np.float64), neuron, {**info, "points_per_hook": len(sample.rows)})


def pca_spectrum(x: np.ndarray, components: int = 64) -> dict[str, Any]:
    """sklearn PCA's explained variance ratio, components for 90% of the variance, eigenvalue participation ratio."""
    x = np.asarray(x, np.float64)
    n = int(min(components, x.shape[0], x.shape[1]))
    full = PCA(n_components=min(x.shape)).fit(x)
    ev = full.explained_variance_
    ratio = full.explained_variance_ratio_
    pr = float(ev.sum() ** 2 / (ev**2).sum()) if (ev**2).sum() > 0 else float("nan")
    return {"explained_variance_ratio": ratio[:n].tolist(), "cumulative": np.cumsum(ratio)[:n].tolist(),
            "components_for_90": int(np.searchsorted(np.cumsum(ratio), 0.9) + 1), "participation_ratio": pr}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of x [n, p] and y [n, q] over the same n rows (Kornblith et al. 2019)."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator) if denominator > 0 else float("nan")


def cka_matrix(store: ActivationStore, hooks: Sequence[str], sample: Optional[Sample] = None,
               max_elements: int = SAMPLE_ELEMENTS) -> dict[str, Any]:
    """Linear CKA of every pair of hooks over one bounded sample of rows."""
    hooks = check_hooks(store, hooks)
    if sample is None or not all(h in sample.values for h in hooks):
        sample = sample_rows(store, hooks, max_elements)
    m = np.ones((len(hooks), len(hooks)))
    for i in range(len(hooks)):
        for j in range(i + 1, len(hooks)):
            m[i, j] = m[j, i] = linear_cka(sample.values[hooks[i]], sample.values[hooks[j]])
    return {"hooks": list(hooks), "layers": [hook_layer(store, h) for h in hooks], "cka": m.tolist(), "sample_rows": len(sample.rows)}


def neuron_correlation(
    store: ActivationStore, hook_a: str, hook_b: str, method: str = "pearson", top: int = 20,
    sample: Optional[Sample] = None, max_elements: int = SAMPLE_ELEMENTS, with_matrix: bool = False,
) -> dict[str, Any]:
    """Correlation of each neuron of hook_a with each of hook_b over the same rows, and the strongest pairs.

    JSON-ready; `with_matrix` adds the whole [width_a, width_b] matrix as nested lists.
    """
    check_hooks(store, [hook_a, hook_b])
    if method not in ("pearson", "spearman"):
        raise NeuronError(f"method must be 'pearson' or 'spearman', got {method!r}.")
    if sample is None or hook_a not in sample.values or hook_b not in sample.values:
        sample = sample_rows(store, [hook_a, hook_b], max_elements)
    a, b = sample.values[hook_a].astype(np.float64), sample.values[hook_b].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "pearson":
            full = np.corrcoef(a, b, rowvar=False)
        else:
            rho = scipy.stats.spearmanr(a, b).statistic
            full = np.array([[1.0, rho], [rho, 1.0]]) if np.ndim(rho) == 0 else rho  # two columns: a scalar
    r = np.nan_to_num(full[: a.shape[1], a.shape[1]:], nan=0.0)
    flat = np.argsort(-np.abs(r), axis=None, kind="stable")[:top]
    pairs = [{"neuron_a": int(i // r.shape[1]), "neuron_b": int(i % r.shape[1]), "r": float(r.flat[i])} for i in flat]
    out = {"hook_a": hook_a, "hook_b": hook_b, "method": method, "sample_rows": len(sample.rows),
           "mean_abs_r": float(np.abs(r).mean()), "max_abs_r": float(np.abs(r).max()), "top_pairs": pairs}
    return {**out, "r": r.tolist()} if with_matrix else out
