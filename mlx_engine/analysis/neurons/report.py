"""Every neuron analysis of one store, computed: `neuron_report(store, options)` returns plain data.

The result holds JSON-ready dicts and lists (what an HTTP route would answer) beside the
few result objects the figures draw (`_objects`). Which neurons are shown in detail: in
each hook, the `detail` neurons with the largest online maximum (the strongest peaks),
and the most polysemantic one. Pairwise matrices (co-activation clusters, the PMI graph) of a
hook wider than `max_neurons` cover its most active neurons only (the report says so). Which tokens are queried in reverse: `tokens` if given,
else the `query_tokens` most frequent tokens of the store. Everything else covers every
neuron of every hook analysed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from ...store.reader import ActivationStore
from .clustering import METHODS as CLUSTER_METHODS
from .clustering import cluster_neurons
from .common import SAMPLE_ELEMENTS, NeuronError, TokenText, check_hooks, hook_name, sample_rows
from .compare import compare_stores
from .examples import examples_text, top_examples
from .polysemantic import polysemanticity
from .projections import cka_matrix, neuron_correlation, pca_spectrum, project_positions, umap_available
from .reverse import ngram_table, token_neurons
from .specialization import communities, pmi_graph, si_modularity_row, specialization, task_labels
from .stats import distribution, layer_summary, neuron_table


@dataclass
class ReportOptions:
    """What `analyze report` computes; every field has the command line's default."""

    hooks: Optional[list[str]] = None
    detail: int = 2
    examples: int = 10
    context: int = 6
    ngrams: tuple[int, ...] = (1, 2, 3)
    min_count: int = 2
    tokens: Optional[list[str]] = None
    query_tokens: int = 2
    dead_threshold: Optional[float] = None
    bounds: Optional[tuple[float, float]] = None
    n_clusters: int = 6
    eps: float = 0.5
    distance: float = 0.5
    projections: tuple[str, ...] = ("pca", "tsne", "umap")
    points: int = 600
    task_field: Optional[str] = None
    pmi_edges: int = 150
    pmi_min_count: int = 5
    held_out: Optional[list[str]] = None
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    window: int = 256
    windows: int = 4
    compare: Optional[str] = None
    max_elements: int = SAMPLE_ELEMENTS
    max_neurons: int = 2048
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def _projection_hooks(store: ActivationStore, hooks: list[str]) -> list[str]:
    """The largest group of hooks of one component and width (e.g. every layer's residual), for joint projections."""
    groups: dict[tuple[str, int], list[str]] = {}
    for h in hooks:
        info = store.hook_info(h)
        groups.setdefault((info["component"], info["width"]), []).append(h)
    return max(groups.values(), key=len)


def neuron_report(store: ActivationStore, options: Optional[ReportOptions] = None, kit: Any = None) -> dict[str, Any]:
    """All of the store's neuron analyses (see the package docstring), as plain data plus `_objects` for figures."""
    o = options or ReportOptions()
    hooks = check_hooks(store, o.hooks)
    text = TokenText(store, kit)
    names = {h: hook_name(store, h) for h in hooks}
    notes = list(o.notes)
    sample = sample_rows(store, hooks, o.max_elements)
    tables = {h: neuron_table(store, h, o.dead_threshold) for h in hooks}
    dists = {h: distribution(store, h, bounds=o.bounds, sample=sample) for h in hooks}
    out: dict[str, Any] = {"store": str(store.path), "tokens": store.num_tokens, "documents": store.manifest.get("num_documents"),
                           "model": store.manifest["model"]["id"], "hooks": hooks, "names": names, "tokenizer": text.source,
                           "sample_rows": len(sample.rows), "sample_exact": sample.exact}
    out["layers"] = [layer_summary(tables[h], dists[h]) for h in hooks]
    out["dead"] = {h: np.nonzero(tables[h].dead)[0].tolist() for h in hooks}
    out["saturated"] = {h: {"neurons": np.nonzero(dists[h].saturated)[0].tolist(), "rule": dists[h].rule} for h in hooks}

    detail: dict[str, list[int]] = {}
    poly: dict[str, list[dict[str, Any]]] = {}
    for h in hooks:
        poly[h] = polysemanticity(store, h, distance=o.distance, text=text)
        strongest = np.argsort(-tables[h].state.maximum, kind="stable")[: o.detail].tolist()
        detail[h] = strongest + [r["neuron"] for r in poly[h][:1] if r["neuron"] not in strongest]
    out["polysemantic"] = {h: poly[h][:10] for h in hooks}
    out["polysemantic_clusters"] = {h: [p["clusters"] for p in sorted(poly[h], key=lambda p: p["neuron"])] for h in hooks}
    out["detail_neurons"] = detail
    out["examples"] = {h: {n: top_examples(store, h, n, o.examples, o.context, text) for n in detail[h]} for h in hooks}
    out["examples_text"] = {h: {n: examples_text(e) for n, e in ex.items()} for h, ex in out["examples"].items()}

    reverse: dict[str, dict[int, dict[int, list[dict[str, Any]]]]] = {h: {} for h in hooks}
    unigram_counts: Counter = Counter()
    for h in hooks:
        for n in o.ngrams:
            table = ngram_table(store, h, n, detail[h])
            if n == 1 and not unigram_counts:
                unigram_counts.update({int(k[0]): int(c) for k, c in zip(table.keys, table.counts)})
            for neuron in detail[h]:
                reverse[h].setdefault(neuron, {})[n] = table.top_ngrams(neuron, 10, o.min_count if n > 1 else 1, text)
    out["reverse"] = reverse
    queries: list[Any] = list(o.tokens) if o.tokens else [[t] for t, _ in unigram_counts.most_common(o.query_tokens)]
    out["token_neurons"] = [token_neurons(store, q, hooks, top=8, kit=kit) for q in queries]

    wide = {h: np.argsort(-tables[h].state.frac_active, kind="stable")[: o.max_neurons].tolist() for h in hooks
            if tables[h].width > o.max_neurons}  # pairwise matrices of a wide hook: its most active neurons only
    for h, chosen in wide.items():
        notes.append(f"{h}: co-activation clusters and the PMI graph cover its {len(chosen)} most active of {tables[h].width} neurons.")
    clusters = {(h, m): cluster_neurons(store, [h], m, o.n_clusters, o.eps, seed=o.seed, sample=sample, neurons=wide or None)
                for h in hooks for m in CLUSTER_METHODS}
    out["clusters"] = [{"hook_id": h, "method": m, "clusters": len(set(c.labels[c.labels >= 0].tolist())),
                        "noise": int((c.labels < 0).sum()), "silhouette": c.silhouette, "sizes": [x["size"] for x in c.clusters()]}
                       for (h, m), c in clusters.items()]

    joint = _projection_hooks(store, hooks)
    projections = {}
    methods = list(o.projections)
    if "umap" in methods and not umap_available():
        methods.remove("umap")
        notes.append("UMAP was skipped: umap-learn is not installed (pip install umap-learn).")
    strongest_neuron = detail[joint[0]][0]
    for m in methods:
        projections[m] = project_positions(store, joint, m, o.points, neuron=strongest_neuron, seed=o.seed, text=text)
    out["projections"] = {m: {"hooks": joint, "info": p.info, "points": len(p.row)} for m, p in projections.items()}
    out["pca"] = {h: pca_spectrum(sample.values[h]) for h in hooks}
    out["cka"] = cka_matrix(store, hooks, sample)
    out["correlations"] = [neuron_correlation(store, a, b, method, top=5, sample=sample)
                           for a, b in zip(hooks, hooks[1:]) for method in ("pearson", "spearman")]

    specs: dict[str, Any] = {}
    if o.task_field:
        labels = task_labels(store, o.task_field)
        specs = {h: specialization(store, h, labels) for h in hooks}
        out["specialization"] = {h: s.to_json() for h, s in specs.items()}
    graphs = {h: pmi_graph(store, h, o.pmi_edges, o.pmi_min_count, neurons=wide or None) for h in hooks}
    found = {h: communities(g, o.seed) for h, g in graphs.items()}
    out["communities"] = found
    out["si_modularity"] = [si_modularity_row(h, tables[h].layer, specs.get(h), found[h]) for h in hooks]

    if o.held_out:
        from ...loading import load_model
        from .dynamic_k import dynamic_k, held_out_text

        model = kit or load_model(store.manifest["model"]["path"])
        out["dynamic_k"] = dynamic_k(model, held_out_text(o.held_out), o.fractions, o.seeds, o.window, o.windows)
    if o.compare:
        from .common import open_store

        out["comparison"] = compare_stores(store, open_store(o.compare), [h for h in hooks], o.max_elements)
    out["notes"] = notes
    out["options"] = {k: v for k, v in asdict(o).items() if k != "notes"}
    out["_objects"] = {"tables": tables, "distributions": dists, "clusters": clusters, "projections": projections,
                       "specializations": specs, "graphs": graphs}
    return out


def check_options(store: ActivationStore, o: ReportOptions) -> None:
    """Refuse a bad request before any slow part runs."""
    hooks = check_hooks(store, o.hooks)
    for name in ("detail", "examples", "query_tokens", "n_clusters", "points", "windows", "window", "max_neurons", "max_elements"):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NeuronError(f"{name} must be a positive integer, got {value!r}.")
    if any(n < 1 for n in o.ngrams):
        raise NeuronError(f"n-gram lengths must be positive, got {list(o.ngrams)}.")
    if o.held_out:
        from .dynamic_k import held_out_text

        held_out_text(o.held_out)
    if o.task_field:
        task_labels(store, o.task_field)
    if o.compare:
        from .common import open_store

        other = open_store(o.compare)
        missing = [h for h in hooks if h not in other.hooks]
        if missing:
            raise NeuronError(f"the store to compare with, {other.path}, lacks {', '.join(missing)}; give --hooks that both hold.")
