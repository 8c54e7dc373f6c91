"""Figures of the population analyses: co-activation clusters, projections, PCA spectra, CKA, specialization,
the PMI graph, dynamic-k and store comparison (the conventions of analysis/figures.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import networkx as nx
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap

from ..figures import FigureFiles, heatmap, save
from .figures import panels


def coactivation_figure(clusters: Any, name: str, folder: Path) -> FigureFiles:
    """The co-activation matrix with neurons ordered by cluster, cluster borders drawn."""
    order = clusters.order
    matrix = clusters.coactivation[np.ix_(order, order)]
    labels = [f"{clusters.neuron_of[i]}" for i in order]
    fig, ax = panels((9.0, 7.5))
    heatmap(ax, matrix, xlabels=labels, ylabels=labels, xlabel="neuron (ordered by cluster)", ylabel="neuron (ordered by cluster)",
            cbar="co-activation (Pearson r over tokens)", cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    sorted_labels = clusters.labels[order]
    for edge in np.nonzero(np.diff(sorted_labels))[0]:
        ax.axhline(edge + 0.5, color="black", linewidth=0.6)
        ax.axvline(edge + 0.5, color="black", linewidth=0.6)
    sil = "n/a" if clusters.silhouette is None else f"{clusters.silhouette:.3f}"
    title = f"Neurons of {', '.join(clusters.hooks)} clustered by co-activation ({clusters.method}, silhouette {sil})"
    ax.set_title(title, fontsize=10)
    rows = [{"hook_id": clusters.hook_of[i], "neuron": int(clusters.neuron_of[i]), "cluster": int(clusters.labels[i])} for i in order]
    return save(fig, folder, name, title, clusters.to_json(), rows)


METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}


def _categorical(values: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    kinds = sorted(set(values), key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(kinds)}
    return np.array([index[v] for v in values]), kinds


def projection_figure(proj: Any, names: dict[str, str], folder: Path) -> FigureFiles:
    """One projection coloured three ways: by layer, by document, and by a neuron's value."""
    views = [("layer", [names[h] for h in proj.hook]), ("document", proj.doc.tolist())]
    if proj.value is not None:
        views.append((f"neuron {proj.neuron} value", None))
    fig, axes = panels((5.2 * len(views), 4.6), 1, len(views), squeeze=False)
    for ax, (label, values) in zip(axes[0], views):
        if values is None:
            image = ax.scatter(proj.coords[:, 0], proj.coords[:, 1], c=proj.value, s=7, cmap="viridis")
            fig.colorbar(image, ax=ax, label=f"activation of neuron {proj.neuron} ({names[proj.hook[0]]})")
        else:
            codes, kinds = _categorical(values)
            if len(kinds) <= 10:  # one tab10 colour per category, a colour bar with one band each
                cmap, norm = ListedColormap([colormaps["tab10"](i) for i in range(len(kinds))]), BoundaryNorm(np.arange(len(kinds) + 1) - 0.5, len(kinds))
                image = ax.scatter(proj.coords[:, 0], proj.coords[:, 1], c=codes, s=7, cmap=cmap, norm=norm)
            else:
                image = ax.scatter(proj.coords[:, 0], proj.coords[:, 1], c=codes, s=7, cmap="viridis")
            bar = fig.colorbar(image, ax=ax, label=label, ticks=range(len(kinds)) if len(kinds) <= 12 else None)
            if len(kinds) <= 12:
                bar.ax.set_yticklabels([str(k) for k in kinds], fontsize=7)
        axis = {"pca": "principal component", "tsne": "t-SNE dimension", "umap": "UMAP dimension"}[proj.method]
        ax.set_xlabel(f"{axis} 1")
        ax.set_ylabel(f"{axis} 2")
        ax.set_title(f"coloured by {label}", fontsize=9)
    ratio = proj.info.get("explained_variance_ratio")
    extra = f" (explained variance {ratio[0]:.3f}, {ratio[1]:.3f})" if ratio else ""
    title = f"{METHOD_NAMES[proj.method]} of {len(proj.row)} token positions{extra}"
    fig.suptitle(title)
    data = proj.to_json()
    return save(fig, folder, f"projection_{proj.method}", title, data, data["points"])


def pca_figure(spectra: dict[str, dict[str, Any]], names: dict[str, str], folder: Path) -> FigureFiles:
    """Cumulative explained variance against the number of principal components, one line per hook."""
    fig, ax = panels((7.5, 4.5))
    rows = []
    for h, s in spectra.items():
        cum = s["cumulative"]
        ax.plot(range(1, len(cum) + 1), cum, marker=".", label=f"{names[h]} (PR {s['participation_ratio']:.1f}, 90% at {s['components_for_90']})")
        rows += [{"hook_id": h, "component": i + 1, "explained_variance_ratio": r, "cumulative": c}
                 for i, (r, c) in enumerate(zip(s["explained_variance_ratio"], cum))]
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    title = "PCA of each layer's token positions: cumulative explained variance"
    ax.set_title(title)
    return save(fig, folder, "pca_variance", title, spectra, rows)


def cka_figure(cka: dict[str, Any], names: dict[str, str], folder: Path) -> FigureFiles:
    """Linear CKA between every pair of hooks."""
    m = np.array(cka["cka"])
    labels = [names[h] for h in cka["hooks"]]
    fig, ax = panels((3.0 + 0.7 * len(labels), 2.5 + 0.6 * len(labels)))
    heatmap(ax, m, xlabels=labels, ylabels=labels, xlabel="layer (hook)", ylabel="layer (hook)", cbar="linear CKA", vmin=0.0, vmax=1.0,
            cells=[[f"{v:.2f}" for v in row] for row in m])
    title = f"Cross-layer similarity: linear CKA (Kornblith et al. 2019) over {cka['sample_rows']} rows"
    ax.set_title(title, fontsize=10)
    rows = [{"hook_a": a, "hook_b": b, "cka": float(m[i, j])} for i, a in enumerate(cka["hooks"]) for j, b in enumerate(cka["hooks"])]
    return save(fig, folder, "cka", title, cka, rows)


def specialization_figure(specs: Sequence[Any], names: dict[str, str], folder: Path) -> FigureFiles:
    """Histogram of the neurons' specialization index per hook (rows: hooks; columns: SI bins)."""
    edges = np.linspace(0.0, 1.0, 11)
    grid = np.array([np.histogram(s.si[np.isfinite(s.si)], bins=edges)[0] for s in specs])
    fig, ax = panels((8.5, 2.2 + 0.45 * len(specs)))
    xl = [f"{a:.1f}-{b:.1f}" for a, b in zip(edges[:-1], edges[1:])]
    heatmap(ax, grid, xlabels=xl, ylabels=[names[s.hook] for s in specs], xlabel="specialization index SI = 1 - H(P(task | active)) / log K",
            ylabel="layer (hook)", cbar="neurons", cmap="magma", vmin=0, cells=[[str(int(v)) for v in row] for row in grid])
    title = f"Task specialization of neurons ({len(specs[0].tasks)} tasks: {', '.join(specs[0].tasks)})"
    ax.set_title(title, fontsize=10)
    rows = [{"hook_id": s.hook, "si_low": float(a), "si_high": float(b), "neurons": int(grid[i, j])}
            for i, s in enumerate(specs) for j, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
    return save(fig, folder, "specialization", title, [s.to_json() for s in specs], rows)


def pmi_graph_figure(graph: nx.Graph, found: dict[str, Any], name: str, what: str, folder: Path) -> FigureFiles:
    """The co-activation PMI graph (spring layout, seeded), nodes coloured by Louvain community."""
    community = {node: i for i, members in enumerate(found["communities"]) for node in members}
    fig, ax = panels((8.0, 6.5))
    rows = [{"node": n, "community": community.get(n, -1)} for n in graph.nodes]
    if graph.number_of_nodes():
        layout = nx.spring_layout(graph, seed=0, weight="weight")
        nodes = list(graph.nodes)
        colours = [community.get(n, -1) for n in nodes]
        nx.draw_networkx_edges(graph, layout, ax=ax, alpha=0.3, width=0.6)
        count = max(1, len(found["communities"]))
        cmap = ListedColormap([colormaps["tab20"](i % 20) for i in range(count)])
        image = nx.draw_networkx_nodes(graph, layout, nodelist=nodes, node_color=colours, cmap=cmap, vmin=-0.5, vmax=count - 0.5,
                                       node_size=40, ax=ax)
        if len(nodes) <= 60:
            nx.draw_networkx_labels(graph, layout, {n: n.rsplit(":", 1)[1] for n in nodes}, font_size=6, ax=ax)
        fig.colorbar(image, ax=ax, label="community (Louvain)")
    ax.set_xlabel("spring layout x (edge weight: PMI)")
    ax.set_ylabel("spring layout y")
    title = (f"Co-activation PMI graph of {what}: {found['edges']} edges, {len(found['communities'])} communities, "
             f"modularity Q = {found['modularity']:.3f}")
    ax.set_title(title, fontsize=10)
    data = {"edges": [{"a": a, "b": b, **d} for a, b, d in graph.edges(data=True)], **found}
    return save(fig, folder, name, title, data, rows)


def dynamic_k_figure(result: dict[str, Any], folder: Path) -> FigureFiles:
    """Perplexity (left axis) and tokens/s (right axis) against the fraction of d_mlp kept, mean ± std over seeds."""
    rows = [r for r in result["summary"] if r["fraction"] != "unmodified"]
    base = next(r for r in result["summary"] if r["fraction"] == "unmodified")
    f = [r["fraction"] for r in rows]
    fig, ax = panels((7.5, 4.5))
    ax.errorbar(f, [r["perplexity_mean"] for r in rows], yerr=[r["perplexity_std"] for r in rows], marker="o", color="tab:blue",
                capsize=3, label="perplexity with top-k")
    ax.axhline(base["perplexity_mean"], color="tab:blue", linestyle="--", linewidth=0.8, label=f"unmodified {base['perplexity_mean']:.3f}")
    ax.set_xlabel(f"fraction of d_mlp = {result['d_mlp']} kept per token (k = fraction x d_mlp) at {result['component']}")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_yscale("log")
    right = ax.twinx()
    right.errorbar(f, [r["tokens_per_second_mean"] for r in rows], yerr=[r["tokens_per_second_std"] for r in rows], marker="s",
                   color="tab:orange", capsize=3, label="tokens/s")
    right.set_ylabel("tokens per second")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper right")
    title = f"Dynamic-k on {result['model']}: perplexity and speed, mean ± std over {len(result['seeds'])} seeds"
    ax.set_title(title, fontsize=10)
    return save(fig, folder, "dynamic_k_plot", title, result, result["summary"])


def compare_figure(comparison: dict[str, Any], names: dict[str, str], folder: Path) -> FigureFiles:
    """Per hook: mean KS statistic, mean Wasserstein distance and linear CKA between the two stores."""
    hooks = comparison["hooks"]
    labels = [names.get(h["hook_id"], h["hook_id"]) for h in hooks]
    x = np.arange(len(hooks))
    fig, axes = panels((max(10.0, 1.2 * len(hooks) + 6), 4.0), 1, 3)
    for ax, key, ylabel in ((axes[0], "ks_mean", "mean KS statistic over neurons"), (axes[1], "wasserstein_mean", "mean Wasserstein distance"),
                            (axes[2], "cka", "linear CKA (a vs b)")):
        ax.bar(x, [np.nan if h[key] is None else h[key] for h in hooks], color="tab:purple")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("layer (hook)")
        ax.set_ylabel(ylabel)
    title = "Two stores compared per layer: KS, Wasserstein, CKA"
    fig.suptitle(title)
    rows = [{k: v for k, v in h.items() if k not in ("neurons", "most_changed")} for h in hooks]
    return save(fig, folder, "store_comparison", title, rows, rows)
