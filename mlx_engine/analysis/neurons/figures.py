"""Figures of the per-neuron statistics, top examples and reverse queries (matplotlib, Agg).

Each is written by analysis/figures.py's `save` (PNG, SVG with text kept as text, and
its numbers as JSON and CSV) and keeps that module's conventions: a title, labelled axes
(token strings, layer numbers), a colour bar with its scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..figures import FigureFiles, heatmap, save, text


def panels(figsize: tuple[float, float], rows: int = 1, cols: int = 1, squeeze: bool = True) -> tuple[Figure, Any]:
    """A constrained-layout Figure (no pyplot, as analysis/figures.py) and its axes."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def sparsity_figure(summaries: Sequence[dict[str, Any]], names: Sequence[str], folder: Path) -> FigureFiles:
    """Per hook: fraction active, dead and saturated counts, compression potential and L1 participation share."""
    x = np.arange(len(names))
    fig, axes = panels((max(10.0, 1.2 * len(names) + 6), 4.2), 1, 3)
    views = [
        (axes[0], [("frac_active", "fraction active")], "fraction of token x neuron values active"),
        (axes[1], [("dead", "dead"), ("saturated", "saturated")], "neurons"),
        (axes[2], [("compression_potential", "share of neurons for 90% of L1 mass"), ("l1_participation_share", "L1 participation ratio / width")],
         "share of the layer's neurons"),
    ]
    for ax, series, ylabel in views:
        width = 0.8 / len(series)
        for j, (key, label) in enumerate(series):
            bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, [s.get(key, 0) for s in summaries], width, label=label)
            ax.bar_label(bars, fmt="%.3g", fontsize=6)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("layer (hook)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1] * 1.1))
        ax.legend(fontsize=7)
    title = "Sparsity per layer: activity, dead and saturated neurons, compression potential"
    fig.suptitle(title)
    return save(fig, folder, "sparsity", title, list(summaries), list(summaries))


def histogram_figure(distributions: Sequence[Any], names: Sequence[str], folder: Path) -> FigureFiles:
    """The pooled activation histogram of each hook (all its neurons' sampled values), log counts."""
    fig, ax = panels((8.0, 4.5))
    rows = []
    for d, name in zip(distributions, names):
        centres = (d.pooled_edges[:-1] + d.pooled_edges[1:]) / 2
        ax.step(centres, np.maximum(d.pooled_counts, 0.8), where="mid", label=f"{name} ({d.sample_rows} of {d.total_rows} rows)")
        rows += [{"hook_id": d.hook, "bin_left": float(lo), "bin_right": float(hi), "count": int(c)}
                 for lo, hi, c in zip(d.pooled_edges[:-1], d.pooled_edges[1:], d.pooled_counts)]
    ax.set_yscale("log")
    ax.set_xlabel("activation value")
    ax.set_ylabel("count of sampled values (log scale)")
    ax.legend(fontsize=7)
    title = "Activation histograms per layer, pooled over neurons"
    ax.set_title(title)
    data = [{"hook_id": d.hook, "edges": d.pooled_edges.tolist(), "counts": d.pooled_counts.tolist()} for d in distributions]
    return save(fig, folder, "activation_histograms", title, data, rows)


def moments_figure(tables: Sequence[Any], names: Sequence[str], folder: Path) -> FigureFiles:
    """Every neuron's skewness against kurtosis, coloured by its fraction active; dead neurons as crosses."""
    fig, axes = panels((3.6 * len(tables) + 1.5, 3.8), 1, len(tables), squeeze=False)
    rows, image = [], None
    for ax, t, name in zip(axes[0], tables, names):
        c = t.columns()
        live = ~c["dead"]
        image = ax.scatter(c["skewness"][live], c["kurtosis"][live], c=c["frac_active"][live], s=8, cmap="viridis", vmin=0, vmax=1)
        ax.scatter(np.zeros(int((~live).sum())), np.zeros(int((~live).sum())), marker="x", color="red", label=f"dead: {int((~live).sum())} (drawn at 0, 0)")
        ax.set_xlabel("skewness")
        ax.set_ylabel("excess kurtosis")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
        rows += [{"hook_id": t.hook, "neuron": i, "skewness": float(c["skewness"][i]), "kurtosis": float(c["kurtosis"][i]),
                  "frac_active": float(c["frac_active"][i]), "dead": bool(c["dead"][i])} for i in range(t.width)]
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="fraction of tokens active")
    title = "Neuron moments per layer (online statistics): skewness, kurtosis and activity"
    fig.suptitle(title)
    return save(fig, folder, "neuron_moments", title, rows, rows)


def examples_figure(examples: Sequence[dict[str, Any]], what: str, name: str, folder: Path, context: int) -> FigureFiles:
    """The top examples as a grid: one row per example, one column per offset from the peak, tokens in the cells."""
    offsets = list(range(-context, context + 1))
    grid = np.full((len(examples), len(offsets)), np.nan)
    cells = [["" for _ in offsets] for _ in examples]
    rows = []
    for i, e in enumerate(examples):
        for j, (tok, v) in enumerate(zip(e["tokens"], e["values"])):
            col = j - e["maxValueTokenIndex"] + context
            if 0 <= col < len(offsets):
                grid[i, col], cells[i][col] = v, text(tok, 6)
            rows.append({"example": i, "offset": j - e["maxValueTokenIndex"], "token": tok, "value": float(v), "doc": e["doc"], "pos": e["pos"]})
    fig, ax = panels((min(22.0, 2.5 + 0.75 * len(offsets)), min(14.0, 1.8 + 0.42 * len(examples))))
    vmax = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    ylabels = [f"{e['maxValue']:.3g} (doc {e['doc']}, pos {e['pos']})" for e in examples]
    heatmap(ax, grid, xlabels=[str(o) for o in offsets], ylabels=ylabels, xlabel="position relative to the peak token",
            ylabel="example: peak value (document, position)", cbar="activation", cmap="RdBu_r", vmin=-vmax, vmax=vmax, cells=cells)
    title = f"Top-activating examples of {what}"
    ax.set_title(title, fontsize=10)
    return save(fig, folder, name, title, list(examples), rows)


def reverse_figure(ngrams: dict[int, list[dict[str, Any]]], what: str, name: str, folder: Path) -> FigureFiles:
    """A neuron's top tokens and n-grams by mean activation over their occurrences, one panel per n."""
    ns = sorted(ngrams)
    fig, axes = panels((4.4 * len(ns), 4.2), 1, len(ns), squeeze=False)
    rows = []
    for ax, n in zip(axes[0], ns):
        items = ngrams[n]
        labels = [text("".join(r["text"]), 16) + f" (n={r['count']})" for r in items]
        ax.barh(range(len(items)), [r["mean"] for r in items], color="tab:orange")
        ax.set_yticks(range(len(items)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("mean activation over occurrences")
        ax.set_ylabel(f"{n}-gram (occurrences)" if n > 1 else "token (occurrences)")
        ax.set_title(f"{n}-grams" if n > 1 else "tokens", fontsize=9)
        rows += [{"n": n, "ngram": " ".join(map(str, r["ngram"])), "text": "".join(r["text"]), "count": r["count"], "mean": r["mean"]} for r in items]
    title = f"Reverse query: the tokens and n-grams that most activate {what}"
    fig.suptitle(title)
    return save(fig, folder, name, title, {str(k): v for k, v in ngrams.items()}, rows)


def token_neurons_figure(result: dict[str, Any], folder: Path, name: str = "token_neurons") -> FigureFiles:
    """Per layer, the neurons a token or n-gram activates most (cell: neuron number; colour: mean activation)."""
    hooks = list(result["hooks"])
    top = max(len(result["hooks"][h]["neurons"]) for h in hooks)
    grid = np.full((len(hooks), top), np.nan)
    cells = [["" for _ in range(top)] for _ in hooks]
    rows = []
    for i, h in enumerate(hooks):
        for j, r in enumerate(result["hooks"][h]["neurons"]):
            grid[i, j], cells[i][j] = r["mean"], str(r["neuron"])
            rows.append({"hook_id": h, "rank": j + 1, **r})
    fig, ax = panels((3.0 + 0.6 * top, 2.0 + 0.45 * len(hooks)))
    heatmap(ax, grid, xlabels=[str(j + 1) for j in range(top)], ylabels=[result["hooks"][h]["name"] for h in hooks],
            xlabel="rank (cell: neuron number)", ylabel="layer (hook)", cbar="mean activation at the n-gram", cells=cells)
    shown = text("".join(result["text"]), 24)
    title = f"Reverse query: the neurons that {shown!r} activates most, per layer ({result['count']} occurrences)"
    ax.set_title(title, fontsize=10)
    return save(fig, folder, name, title, result, rows)


def polysemantic_figure(counts: dict[str, list[int]], names: Sequence[str], folder: Path) -> FigureFiles:
    """How many neurons of each layer have 1, 2, ... clusters of top contexts (`counts`: each neuron's clusters, per hook)."""
    most = max((c for per_hook in counts.values() for c in per_hook), default=1) or 1
    grid = np.zeros((len(counts), most))
    for i, per_hook in enumerate(counts.values()):
        for c in per_hook:
            if c:
                grid[i, c - 1] += 1
    fig, ax = panels((3.5 + 0.5 * most, 2.0 + 0.45 * len(counts)))
    heatmap(ax, grid, xlabels=[str(c + 1) for c in range(most)], ylabels=list(names), xlabel="clusters among a neuron's top contexts",
            ylabel="layer (hook)", cbar="neurons", cmap="magma", vmin=0, cells=[[str(int(v)) for v in row] for row in grid])
    title = "Polysemanticity: neurons per number of distinct context clusters"
    ax.set_title(title, fontsize=10)
    rows = [{"hook_id": h, "clusters": c + 1, "neurons": int(grid[i, c])} for i, h in enumerate(counts) for c in range(most)]
    return save(fig, folder, "polysemanticity", title, rows, rows)
