"""The demo's two pictures, drawn with Pillow from the captured numbers alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

CELL = 16  # residual_norm.png: one CELL x CELL square per (layer, token position)
ATTENTION_CELL = 4  # attention_pattern.png: one square per (query, key) position pair
HEAD_GAP = 4  # white pixels between two heads in attention_pattern.png
HEADS_PER_ROW = 8  # attention_pattern.png wraps to a new row of heads after this many

# Perceptually ordered anchors of the viridis colormap (dark purple -> yellow).
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
     [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]],
    dtype=np.float64,
)
_NOT_ATTENDED = (40, 40, 40)  # key positions a query cannot see (future, or outside the window)
_BACKGROUND = (255, 255, 255)


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


# ----------------------------------------------------------------------------- pictures


def colorize(unit: np.ndarray, missing: tuple[int, int, int] = _NOT_ATTENDED) -> np.ndarray:
    """Values in [0, 1] -> viridis RGB (uint8); NaN -> `missing`."""
    rgb = np.empty(unit.shape + (3,), dtype=np.uint8)
    valid = np.isfinite(unit)
    x = np.clip(np.where(valid, unit, 0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    blended = _VIRIDIS[lo] * (1.0 - frac) + _VIRIDIS[lo + 1] * frac
    rgb[...] = np.round(blended).astype(np.uint8)
    rgb[~valid] = missing
    return rgb


def _cells(rgb: np.ndarray, cell: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)


@dataclass(frozen=True)
class ResidualScale:
    """How norms map to colour: log10 of the norm, from `low` (dark) to `high` (yellow)."""

    low: float
    high: float


def write_residual_png(norms: np.ndarray, path: Path) -> ResidualScale:
    """Rows are layers (layer 0 at the top), columns token positions (position 0 at the left).

    The scale is logarithmic and shared by all layers: residual norms grow with depth
    and a few positions carry norms far above the rest, which a linear scale would
    flatten into one colour.
    """
    logs = np.log10(np.maximum(norms, 1e-12))
    low, high = float(logs.min()), float(logs.max())
    unit = (logs - low) / (high - low) if high > low else np.zeros_like(logs)
    Image.fromarray(_cells(colorize(unit), CELL), "RGB").save(path)
    return ResidualScale(10**low, 10**high)


def attention_layout(heads: int) -> tuple[int, int]:
    """(columns, rows) of the head grid: side by side up to HEADS_PER_ROW, then wrapped."""
    columns = min(heads, HEADS_PER_ROW)
    return columns, -(-heads // columns)


def attention_png_size(heads: int, positions: int) -> tuple[int, int]:
    """(width, height) of attention_pattern.png for `heads` heads over `positions` positions."""
    side = positions * ATTENTION_CELL
    columns, rows = attention_layout(heads)
    return columns * side + (columns - 1) * HEAD_GAP, rows * side + (rows - 1) * HEAD_GAP


def write_attention_png(grid: np.ndarray, path: Path) -> None:
    """Each head in its own square, in reading order; in each, rows are queries, columns keys.

    Colour is the square root of the probability so that weak but real attention stays
    visible next to the near-1 entries; positions the mask hides are dark grey. Heads
    wrap after HEADS_PER_ROW so a 64-head model still gives a picture one can open.
    """
    heads, n, _ = grid.shape
    width, height = attention_png_size(heads, n)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[...] = _BACKGROUND
    side = n * ATTENTION_CELL
    columns, _ = attention_layout(heads)
    for h in range(heads):
        x = (h % columns) * (side + HEAD_GAP)
        y = (h // columns) * (side + HEAD_GAP)
        canvas[y : y + side, x : x + side] = _cells(colorize(np.sqrt(grid[h])), ATTENTION_CELL)
    Image.fromarray(canvas, "RGB").save(path)

