"""The demo's two pictures, drawn with matplotlib from the captured numbers alone.

Each is written twice: a PNG to look at and an SVG twin whose text (title, axis labels,
token strings) stays text, so it can be searched, read by a screen reader and checked by a
test. The figures use matplotlib's object API (no pyplot), so nothing global is touched and
no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

COLORMAP = "viridis"  # the viewer (/ui/) uses the same 256 colours
MASKED = "#d9d9d9"  # keys a query cannot see (later positions, outside a sliding window)
BOUNDARY = "#d62728"  # the prompt/generation boundary
MAX_TICK_LABELS = 80  # beyond this many tokens an axis labels every k-th token
SINK_EPSILON = 1e-4  # rows of a softmax without a sink sum to 1 within float error
_MARKS = {"\n": "↵", "\t": "⇥", "\r": "␍"}


# ----------------------------------------------------------------------------- arrays from the capture


def _entry_array(entry: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(entry["data"], dtype=np.float64).reshape(entry["shape"])


def positions_covered(entries: Sequence[Mapping[str, Any]]) -> int:
    """How many token positions the captures cover, checking they tile [0, n) without gaps."""
    end = 0
    for entry in sorted(entries, key=lambda e: e["positions"][0]):
        start, stop = entry["positions"]
        if start != end:
            raise ValueError(f"{entry['hook_id']}: captures cover positions up to {end}, then start at {start}")
        end = stop
    return end


def residual_norms(neuroscope: Mapping[str, Any], hook_ids: Sequence[str]) -> np.ndarray:
    """L2 norm of the residual stream, [layers, positions], from the NeuroScope entries."""
    rows = []
    for hook_id in hook_ids:
        entries = neuroscope["activations"][hook_id]
        norms = np.zeros(positions_covered(entries))
        for entry in entries:
            start, stop = entry["positions"]
            norms[start:stop] = np.linalg.norm(_entry_array(entry), axis=-1)
        rows.append(norms)
    return np.stack(rows)


def attention_grid(entries: Sequence[Mapping[str, Any]], window: Optional[int] = None) -> np.ndarray:
    """[heads, queries, keys] probabilities over all positions; NaN where the query cannot look.

    A prefill capture holds a column for every key of the chunk, so the masked ones
    arrive as probability 0; they are set to NaN here (later keys, and keys outside a
    sliding window of `window`) so the picture tells "masked" from "not attended to".
    """
    n = positions_covered(entries)
    heads = entries[0]["shape"][0]
    grid = np.full((heads, n, n), np.nan)
    for entry in entries:
        start, stop = entry["positions"]
        keys = np.asarray(entry["key_positions"], dtype=np.int64)
        grid[:, start:stop][:, :, keys] = _entry_array(entry)
    query, key = np.indices((n, n))
    hidden = key > query
    if window:
        hidden |= key <= query - window
    grid[:, hidden] = np.nan
    return grid


def sink_share(grid: np.ndarray) -> np.ndarray:
    """[heads, queries]: 1 - row sum, the probability the sink took (0 for models without one)."""
    return 1.0 - np.nansum(grid, axis=-1)


# ----------------------------------------------------------------------------- labels


def token_label(token: str) -> str:
    """A token as an axis label: control characters marked, spaces at its ends as ␣ (as the viewer does)."""
    marked = "".join(_MARKS.get(c, c) for c in token)
    lead = len(marked) - len(marked.lstrip(" "))
    trail = len(marked) - len(marked.rstrip(" ")) if len(marked) > lead else 0
    return "␣" * lead + marked[lead : len(marked) - trail] + "␣" * trail or "∅"


def _tick_step(n: int) -> int:
    return max(1, math.ceil(n / MAX_TICK_LABELS))


def _token_ticks(axis: Any, tokens: Sequence[str], which: str) -> None:
    """Label an axis with `position token` at every k-th position (every one up to MAX_TICK_LABELS)."""
    step = _tick_step(len(tokens))
    ticks = list(range(0, len(tokens), step))
    labels = [token_label(tokens[i]) if step == 1 else f"{i} {token_label(tokens[i])}" for i in ticks]
    if which == "x":
        axis.set_xticks(ticks, labels, rotation=90, fontsize=7, fontfamily="DejaVu Sans Mono")
    else:
        axis.set_yticks(ticks, labels, fontsize=7, fontfamily="DejaVu Sans Mono")


def _save(fig: Figure, png: Path, svg: Path) -> None:
    fig.savefig(png, dpi=110, bbox_inches="tight", facecolor="white")
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        fig.savefig(svg, bbox_inches="tight", facecolor="white")


# ----------------------------------------------------------------------------- residual norms


@dataclass(frozen=True)
class ResidualScale:
    """The colour scale of residual_norm.png: logarithmic, from `low` (dark) to `high` (yellow)."""

    low: float
    high: float


def residual_title(model: str) -> str:
    return f"Residual stream L2 norm per layer and token ({model})"


def write_residual_pictures(norms: np.ndarray, tokens: Sequence[str], n_prompt: int, model: str, png: Path, svg: Path) -> ResidualScale:
    """Layers down (layer 0 at the top), token positions across, with the token strings.

    The scale is logarithmic and shared by all layers: norms grow with depth and a few
    positions carry norms far above the rest, which a linear scale would flatten.
    """
    layers, positions = norms.shape
    low, high = float(norms.min()), float(norms.max())
    width = min(60.0, max(8.0, 1.8 + 0.14 * min(positions, MAX_TICK_LABELS * 2)))
    fig = Figure(figsize=(width, 2.4 + 0.32 * layers), layout="constrained")
    ax = fig.add_subplot()
    norm = LogNorm(vmin=max(low, 1e-12), vmax=max(high, low * (1 + 1e-9), 1e-12))
    image = ax.imshow(norms, aspect="auto", cmap=COLORMAP, norm=norm, interpolation="nearest")
    ax.set_title(residual_title(model), fontsize=12)
    ax.set_xlabel("token (position, left to right)")
    ax.set_ylabel("layer")
    ax.set_yticks(range(layers), [str(i) for i in range(layers)])
    _token_ticks(ax, tokens[:positions], "x")
    if 0 < n_prompt < positions:
        ax.axvline(n_prompt - 0.5, color=BOUNDARY, linewidth=2)
        ax.annotate("generation →", (n_prompt - 0.5, -0.5), xytext=(3, 4), textcoords="offset points", color=BOUNDARY, fontsize=9, va="bottom", annotation_clip=False)
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    # Plain numbers from the smallest norm to the largest, evenly spaced on the log scale.
    ticks = np.geomspace(norm.vmin, norm.vmax, 5)
    bar.ax.minorticks_off()
    bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    bar.set_label("‖residual‖₂ (log scale)")
    _save(fig, png, svg)
    return ResidualScale(low, high)


# ----------------------------------------------------------------------------- attention


def attention_title(layer: int, layer_type: Optional[str]) -> str:
    kind = f", {layer_type}" if layer_type else ""
    return f"Attention pattern of layer {layer}{kind}: query rows, key columns"


def attention_layout(heads: int) -> tuple[int, int]:
    """(columns, rows) of the head panels: a near-square grid for up to 16 heads, rows of 8 beyond."""
    columns = min(heads, math.ceil(math.sqrt(heads)) if heads <= 16 else 8)
    return columns, -(-heads // columns)


def write_attention_pictures(
    grid: np.ndarray, tokens: Sequence[str], n_prompt: int, layer: int, layer_type: Optional[str], png: Path, svg: Path
) -> bool:
    """One panel per head, in reading order; in each, rows are queries and columns keys.

    Colour is the probability on a square-root scale, so weak but real attention shows next
    to the near-1 entries; keys the mask hides are grey. Returns whether the rows exclude a
    sink's share (they sum to less than 1), which the figure then says.
    """
    heads, n, _ = grid.shape
    sinks = bool(np.nanmax(sink_share(grid)) > SINK_EPSILON)
    columns, rows = attention_layout(heads)
    side = min(9.0, max(3.2, 0.12 * min(n, MAX_TICK_LABELS))) if heads <= 16 else max(2.4, min(5.0, 0.06 * n))
    fig = Figure(figsize=(columns * side + 1.5, rows * side + 1.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    cmap = matplotlib.colormaps[COLORMAP].with_extremes(bad=MASKED)
    norm = Normalize(0.0, 1.0)
    image = None
    for h, ax in enumerate(axes):
        if h >= heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(np.sqrt(grid[h]), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=12)
        if h % columns == 0:
            ax.set_ylabel("query token")
        if h // columns == rows - 1 or h + columns >= heads:
            ax.set_xlabel("key token")
        if heads <= 16:
            _token_ticks(ax, tokens[:n], "x")
            _token_ticks(ax, tokens[:n], "y")
        if 0 < n_prompt < n:
            ax.axvline(n_prompt - 0.5, color=BOUNDARY, linewidth=1)
            ax.axhline(n_prompt - 0.5, color=BOUNDARY, linewidth=1)
    sink_note = "rows exclude the sink's share (sink share = 1 − row sum)" if sinks else "rows sum to 1 (no attention sink)"
    fig.suptitle(f"{attention_title(layer, layer_type)}; {sink_note}; red lines: generation starts; grey: masked", fontsize=13)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[:heads]), pad=0.01, fraction=0.03)
        ticks = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0]
        bar.set_ticks([math.sqrt(t) for t in ticks], labels=[f"{t:g}" for t in ticks])
        bar.set_label("attention probability (square-root scale)")
    _save(fig, png, svg)
    return sinks
