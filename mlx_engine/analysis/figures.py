"""The analyses drawn with matplotlib: each figure as PNG and SVG, its numbers as JSON and CSV beside it.

Figures are `matplotlib.figure.Figure` objects, never pyplot's: no global backend or
figure registry is touched, so drawing is safe from a server's threads and leaves a
notebook's backend alone (matplotlib's "embedding in a web application server" advice).
PNG is written by the Agg canvas, SVG by the SVG canvas.

Every figure has a title, labelled axes (token strings, layer and head numbers) and a
colour bar with its scale. SVG text stays text (`svg.fonttype = "none"` while saving), so a
title or a token can be searched in the file. Token strings are escaped for matplotlib
(`$` would start mathtext).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .common import label

DPI = 110
MAX_TICKS = 48  # more positions than this get every k-th tick label
ANNOTATE_LIMIT = 40  # annotate cells only when both axes are at most this long


@dataclass
class FigureFiles:
    """One written figure: its name, title, and files (png, svg, json, csv) relative to the folder."""

    name: str
    title: str
    files: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "files": self.files}


def text(s: str, width: int = 12) -> str:
    """A token string as matplotlib should show it: spaces as "␣", escaped, shortened, `$` literal."""
    return label(s.replace(" ", "\u2423"), width).replace("$", r"\$")


def save(fig: Any, folder: Path, name: str, title: str, data: Any, rows: Sequence[dict[str, Any]]) -> FigureFiles:
    """Write `fig` as PNG and SVG, `data` as JSON and `rows` as CSV, all under `name`; never overwrite."""
    files = {"png": f"{name}.png", "svg": f"{name}.svg", "json": f"{name}.json", "csv": f"{name}.csv"}
    for f in files.values():
        if (folder / f).exists():
            raise FileExistsError(f"{folder / f} exists; an analysis folder is written once.")
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        # A long colour-bar label can reach past the figure's edge; "tight" keeps every label inside.
        fig.savefig(folder / files["png"], dpi=DPI, bbox_inches="tight")
        fig.set_layout_engine("none")  # the constrained layout is computed once; the SVG reuses it
        fig.savefig(folder / files["svg"], bbox_inches="tight")
    (folder / files["json"]).write_text(json.dumps(data, indent=1, allow_nan=True))
    with open(folder / files["csv"], "w", newline="", encoding="utf-8") as fh:
        columns = list(rows[0]) if rows else []
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return FigureFiles(name, title, files)


def _ticks(labels: Sequence[str]) -> tuple[list[int], list[str]]:
    step = max(1, int(np.ceil(len(labels) / MAX_TICKS)))
    idx = list(range(0, len(labels), step))
    return idx, [labels[i] for i in idx]


def heatmap(
    ax: Any, data: np.ndarray, *, xlabels: Sequence[str], ylabels: Sequence[str], xlabel: str, ylabel: str,
    cbar: str, cmap: str = "viridis", vmin: Optional[float] = None, vmax: Optional[float] = None,
    cells: Optional[Sequence[Sequence[str]]] = None, title: Optional[str] = None, extend: str = "neither",
) -> None:
    """One labelled heatmap with its colour bar; `cells` writes a string in each cell."""
    image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    xi, xl = _ticks(list(xlabels))
    yi, yl = _ticks(list(ylabels))
    ax.set_xticks(xi, xl, rotation=90, fontsize=7)
    ax.set_yticks(yi, yl, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    bar = ax.figure.colorbar(image, ax=ax, extend=extend)
    bar.set_label(cbar)
    if cells is not None and data.shape[0] <= ANNOTATE_LIMIT and data.shape[1] <= ANNOTATE_LIMIT:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                r, g, b, _ = image.cmap(image.norm(data[i, j]))
                light = 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5  # relative luminance of the cell's colour
                ax.text(j, i, cells[i][j], ha="center", va="center", fontsize=6, color="black" if light else "white")


def figure(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A constrained-layout Figure with one axes (no pyplot)."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def _size(cols: int, rows: int) -> tuple[float, float]:
    return (min(22.0, 3.0 + 0.45 * cols), min(16.0, 2.0 + 0.45 * rows))


def _layer_labels(layers: Sequence[Any]) -> list[str]:
    return [str(layer) if str(layer).startswith("emb") else f"layer {layer}" for layer in layers]


def lens_figures(lens: Any, folder: Path) -> list[FigureFiles]:
    """The logit lens: p(next token) with the top-1 token in each cell, and KL to the final layer."""
    xlabels = [f"{p}: {text(s)}" for p, s in enumerate(lens.token_strings)]
    ylabels = _layer_labels(lens.layers)
    rows = [
        {"layer": layer, "position": p, "token": lens.token_strings[p], "next_token": lens.next_strings[p],
         "next_prob": float(lens.next_prob[i, p]), "next_rank": int(lens.next_rank[i, p]),
         "top1": lens.top_strings[i][p][0], "top1_prob": float(lens.top_probs[i, p, 0]), "kl_to_final": float(lens.kl_to_final[i, p])}
        for i, layer in enumerate(lens.layers) for p in range(len(lens.tokens))
    ]
    out = []
    title = "Logit lens: probability of the next token per layer (cell: the layer's top-1 token)"
    fig, ax = figure(figsize=_size(len(xlabels), len(ylabels)))
    cells = [[text(lens.top_strings[i][p][0], 6) for p in range(len(lens.tokens))] for i in range(len(lens.layers))]
    heatmap(ax, lens.next_prob, xlabels=xlabels, ylabels=ylabels, xlabel="position: input token",
            ylabel="residual stream after layer", cbar="p(next token)", vmin=0.0, vmax=1.0, cells=cells)
    ax.set_title(title)
    out.append(save(fig, folder, "logit_lens", title, lens.to_json(), rows))
    title = "Logit lens: KL divergence from the final distribution"
    fig, ax = figure(figsize=_size(len(xlabels), len(ylabels)))
    heatmap(ax, lens.kl_to_final, xlabels=xlabels, ylabels=ylabels, xlabel="position: input token",
            ylabel="residual stream after layer", cbar="KL(final || layer) [nats]", cmap="magma", vmin=0.0)
    ax.set_title(title)
    kl = {"layers": lens.layers, "token_strings": lens.token_strings, "kl_to_final": lens.kl_to_final.tolist()}
    out.append(save(fig, folder, "logit_lens_kl", title, kl, [{k: r[k] for k in ("layer", "position", "token", "kl_to_final")} for r in rows]))
    return out


def attribution_figures(attr: Any, folder: Path) -> list[FigureFiles]:
    """DLA: one bar per component (embedding, each layer's attention and MLP, constants), and heads as a heatmap."""
    what = f"logit({text(attr.target_string)!r}) - logit({text(attr.foil_string)!r}) at position {attr.position} ({text(attr.token_strings[attr.position])!r})"
    names = ["embedding"] + [f"L{i} {kind}" for i in range(len(attr.attention)) for kind in ("attention", "mlp")] + list(attr.constants)
    values = [attr.embedding] + [float(v) for i in range(len(attr.attention)) for v in (attr.attention[i], attr.mlp[i])] + list(attr.constants.values())
    title = f"Direct logit attribution of {what}"
    fig, ax = figure(figsize=(8.0, 1.5 + 0.3 * len(names)))
    colours = ["tab:blue" if v >= 0 else "tab:red" for v in values]
    ax.barh(range(len(names)), values, color=colours)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"contribution to the logit difference (total {attr.total:.4g}, sum of terms {attr.sum_of_terms:.4g})")
    ax.set_ylabel("component")
    ax.set_title(title, fontsize=10)
    out = [save(fig, folder, "dla_components", title, attr.to_json(), [{"component": n, "value": v} for n, v in zip(names, values)])]
    if attr.heads is not None:
        title = f"Direct logit attribution per head of {what}"
        fig, ax = figure(figsize=_size(attr.heads.shape[1] + 4, attr.heads.shape[0] + 2))
        vmax = float(np.abs(attr.heads).max()) or 1.0
        cells = [[f"{v:.2f}" for v in row] for row in attr.heads]
        heatmap(ax, attr.heads, xlabels=[f"head {h}" for h in range(attr.heads.shape[1])], ylabels=_layer_labels(range(attr.heads.shape[0])),
                xlabel="head", ylabel="layer", cbar="contribution to the logit difference", cmap="RdBu", vmin=-vmax, vmax=vmax, cells=cells)
        ax.set_title(title, fontsize=10)
        rows = [{"layer": i, "head": h, "value": float(attr.heads[i, h])} for i in range(attr.heads.shape[0]) for h in range(attr.heads.shape[1])]
        out.append(save(fig, folder, "dla_heads", title, {"heads": attr.heads.tolist(), "attention_bias": attr.attention_bias.tolist()}, rows))
    return out


METRIC_LABELS = {
    "entropy": "attention entropy [nats]", "previous_token": "previous-token score", "duplicate_token": "duplicate-token score",
    "induction": "induction score", "sink_mass": "sink mass", "importance_zero": "loss change, zero ablation [nats]",
    "importance_mean": "loss change, mean ablation [nats]",
}


def head_figure(scores: Any, folder: Path) -> FigureFiles:
    """Every measured head score as a layer x head heatmap, one panel per score."""
    metrics = [m for m, t in scores.tables.items() if t is not None]
    cols = min(3, len(metrics))
    nrows = int(np.ceil(len(metrics) / cols))
    fig = Figure(figsize=(4.6 * cols, 0.5 + (1.2 + 0.35 * scores.n_layers) * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        table = scores.tables[metric]
        signed = metric.startswith("importance")
        vmax = float(np.abs(table).max()) or 1.0
        heatmap(ax, table, xlabels=[str(h) for h in range(scores.n_heads)], ylabels=[str(i) for i in range(scores.n_layers)],
                xlabel="head", ylabel="layer", cbar=METRIC_LABELS[metric], cmap="RdBu" if signed else "viridis",
                vmin=-vmax if signed else 0.0, vmax=vmax if signed else (1.0 if metric not in ("entropy",) else None),
                cells=[[f"{v:.2f}" for v in row] for row in table], title=METRIC_LABELS[metric])
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    title = f"Attention head scores (repeated random sequence of {scores.repeat_length} tokens; importance on the text)"
    fig.suptitle(title)
    return save(fig, folder, "head_scores", title, scores.to_json(), scores.rows())


def patching_figure(result: Any, folder: Path) -> FigureFiles:
    """Recovered fraction per restored site: layer x position (or layer x head for z)."""
    if result.column_kind == "position":
        xlabels = [f"{p}: {text(result.clean_strings[p])}" + ("" if result.clean_strings[p] == result.corrupted_strings[p]
                   else f" / {text(result.corrupted_strings[p])}") for p in result.columns]
        xlabel = "restored position: clean token / corrupted token"
    else:
        xlabels, xlabel = [f"head {h}" for h in result.columns], "restored head (all positions)"
    what = (f"logit({text(result.target_string)!r}) - logit({text(result.foil_string)!r})" if result.foil_string is not None
            else f"p({text(result.target_string)!r})")
    title = f"Activation patching of {result.component}: recovered fraction of {what} at position {result.position}"
    fig, ax = figure(figsize=_size(len(xlabels) + 4, len(result.layers) + 2))
    heatmap(ax, result.fractions, xlabels=xlabels, ylabels=_layer_labels(result.layers), xlabel=xlabel, ylabel="layer",
            cbar="recovered fraction (metric - corrupted) / (clean - corrupted)", cmap="RdBu", vmin=-1.0, vmax=1.0,
            cells=[[f"{v:.2f}" for v in row] for row in result.fractions], extend="both")
    ax.set_title(title, fontsize=10)
    rows = [{"layer": layer, result.column_kind: col, "fraction": float(result.fractions[i, j]), "metric": float(result.metrics[i, j])}
            for i, layer in enumerate(result.layers) for j, col in enumerate(result.columns)]
    return save(fig, folder, f"patching_{result.component}", title, result.to_json(), rows)
