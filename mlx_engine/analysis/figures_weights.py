"""The weight analyses drawn: spectra, ranks and distribution per layer, and change across checkpoints.

The conventions are figures.py's (Figure objects without pyplot, PNG + SVG with text kept, JSON + CSV beside each).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .figures import FigureFiles, heatmap, save

TOP_MATRICES = 8  # lines in the checkpoint figure: the matrices that change most


def _kind(component: str) -> str:
    return re.sub(r"\[\d+\]$", "", component)


def spectra_figure(report: Any, folder: Path) -> FigureFiles:
    """Normalised singular values sigma_i / sigma_1 of every matrix, one panel per component, coloured by layer."""
    kinds = list(dict.fromkeys(_kind(m.component) for m in report.matrices if m.singular_values is not None))  # every kind: none left out
    layers = [m.layer for m in report.matrices if m.layer is not None]
    top = max(layers) if layers else 0
    cols = min(3, len(kinds))
    nrows = int(np.ceil(len(kinds) / cols))
    fig = Figure(figsize=(4.8 * cols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(top, 1))
    for ax, kind in zip(axes.flat, kinds):
        for m in report.matrices:
            if _kind(m.component) == kind and m.singular_values is not None and m.singular_values[0] > 0:
                s = m.singular_values / m.singular_values[0]
                colour = "black" if m.layer is None else cmap(norm(m.layer))
                ax.semilogy(np.arange(1, s.size + 1), s, color=colour, linewidth=0.8, alpha=0.8)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("singular value index i")
        ax.set_ylabel("sigma_i / sigma_1")
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist())
    bar.set_label("layer (black: embedding and head)")
    if top <= 40:
        bar.set_ticks(range(top + 1))
    title = f"Singular value spectra of {report.model_id}, normalised by the largest"
    fig.suptitle(title)
    data = {m.name: m.singular_values.tolist() for m in report.matrices if m.singular_values is not None}
    rows = [{"matrix": name, "index": i + 1, "singular_value": v} for name, values in data.items() for i, v in enumerate(values)]
    return save(fig, folder, "singular_values", title, {"model": report.model_id, "singular_values": data}, rows)


def _layer_grid(report: Any, statistic: str, relative: bool = False) -> tuple[np.ndarray, list[str], int]:
    table = report.layer_table(statistic)
    kinds = sorted(table)
    n_layers = max(len(v) for v in table.values())
    grid = np.full((len(kinds), n_layers), np.nan)
    sizes = {(_kind(m.component), m.layer): min(m.shape) for m in report.matrices if m.layer is not None}
    for r, kind in enumerate(kinds):
        for c, v in enumerate(table[kind]):
            if v is not None:
                grid[r, c] = v / sizes[kind, c] if relative else v
    return grid, kinds, n_layers


def layer_figure(report: Any, folder: Path) -> FigureFiles:
    """Per layer and component: effective rank / min(m, n), stable rank, std and excess kurtosis."""
    panels = [("effective_rank", True, "effective rank / min(rows, cols)"), ("stable_rank", False, "stable rank ||W||_F^2 / ||W||_2^2"),
              ("std", False, "standard deviation"), ("kurtosis", False, "excess kurtosis")]
    panels = [p for p in panels if any(p[0] in m.values for m in report.matrices if m.layer is not None)]
    fig = Figure(figsize=(9.0, 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)
    data: dict[str, Any] = {}
    rows = []
    for ax, (statistic, relative, name) in zip(axes.flat, panels):
        grid, kinds, n_layers = _layer_grid(report, statistic, relative)
        heatmap(ax, grid, xlabels=[f"layer {i}" for i in range(n_layers)], ylabels=kinds, xlabel="layer", ylabel="matrix",
                cbar=name, cells=[[f"{v:.3g}" for v in row] for row in grid], title=name)
        data[statistic] = {"components": kinds, "values": grid.tolist(), "relative_to_min_dim": relative}
        rows += [{"statistic": statistic, "component": k, "layer": c, "value": float(grid[r, c])}
                 for r, k in enumerate(kinds) for c in range(n_layers)]
    title = f"Weight statistics of {report.model_id} per layer and matrix (experts averaged)"
    fig.suptitle(title)
    return save(fig, folder, "weights_by_layer", title, data, rows)


def comparison_figure(comparison: Any, folder: Path, statistic: str = "frobenius_norm") -> FigureFiles:
    """Neighbour relative change of the most-changed matrices, and their `statistic` with its change point marked."""
    ranked = comparison.ranked("relative_change")[:TOP_MATRICES]
    k = np.arange(len(comparison.checkpoints))
    fig = Figure(figsize=(9.0, 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for rank, row in enumerate(ranked):
        name = row["matrix"]
        change = [np.nan if c is None else c for c in comparison.relative_change[name]]
        top.plot(k, change, marker="o", label=name)
        series = comparison.series[statistic][name]
        line = bottom.plot(k, series, marker="o", label=name)[0]
        cp = comparison.change_points[name][statistic]
        if rank == 0 and cp.split_at is not None:  # every change point is in the JSON; the figure marks the top one
            bottom.axvline(cp.split_at - 0.5, color=line.get_color(), linestyle="--", linewidth=0.8)
    top.set_ylabel("relative change ||W_k - W_k-1||_F / ||W_k-1||_F")
    top.set_title("Change from the previous checkpoint", fontsize=10)
    bottom.set_ylabel(statistic)
    bottom.set_xlabel("checkpoint k")
    bottom.set_title(f"{statistic} (dashed: least-squares change point of the most-changed matrix)", fontsize=10)
    bottom.set_xticks(k, [f"{i}: {Path(c).name or c}" for i, c in enumerate(comparison.checkpoints)], rotation=30, fontsize=7)
    if ranked:
        top.legend(fontsize=6, loc="best")
    title = f"Weights across {len(comparison.checkpoints)} checkpoints: the {len(ranked)} matrices that change most"
    fig.suptitle(title)
    rows = [{"matrix": r["matrix"], "checkpoint": i, "relative_change": comparison.relative_change[r["matrix"]][i],
             statistic: comparison.series[statistic][r["matrix"]][i]} for r in ranked for i in k]
    return save(fig, folder, "checkpoint_comparison", title, comparison.to_json(), rows)
