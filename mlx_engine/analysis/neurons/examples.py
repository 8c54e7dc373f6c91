"""Top-activating examples of a neuron or of a direction, with their context, in Neuronpedia's format.

A neuron's examples are the store's online top-k (no pass over the rows: ties go to the
earlier (document, position)); a direction's (any vector v of the hook's width) need one
streaming pass: each block's projections x . v, the running k best kept by np.lexsort
(value descending, then row). Every example carries Neuronpedia's activation fields over
the stored rows of the same document within `context` positions of the peak: `tokens`
(strings), `values`, `maxValue`, `maxValueTokenIndex`, plus `token_ids`, `positions`,
`doc`, `pos`, `row` and the peak `value`.

`examples_text` shades each token with a block glyph by its value over the examples'
largest (the glyph before it: none below 25%, then ░ ▒ ▓ from 25, 50, 75% and █ at the largest; the peak in «»);
`examples_html` shades each token's background (alpha = value / max, negative values blue)
with the value as its tooltip.
"""

from __future__ import annotations

import html
from typing import Any, Optional, Sequence

import numpy as np

from ...store.reader import ActivationStore
from .common import BLOCK_ROWS, NeuronError, TokenText, check_hooks, check_neurons, iter_blocks


def _window(store: ActivationStore, row: int, context: int) -> np.ndarray:
    """The rows of the same document within `context` positions of `row` (rows are in (doc, pos) order)."""
    docs, _ = store.index()
    lo, hi = max(0, row - context), min(store.num_tokens, row + context + 1)
    window = np.arange(lo, hi)
    return window[docs[lo:hi] == docs[row]]


def _example(store: ActivationStore, text: TokenText, row: int, value: float, window: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    doc, pos = store.index()
    tokens = store.tokens()[window]
    return {
        "value": float(value), "row": int(row), "doc": int(doc[row]), "pos": int(pos[row]),
        "token_id": int(store.tokens()[row]), "token": text.one(int(store.tokens()[row])),
        "tokens": text(tokens), "token_ids": tokens.tolist(), "positions": pos[window].tolist(), "values": values.tolist(),
        "maxValue": float(value), "maxValueTokenIndex": int(np.nonzero(window == row)[0][0]),
    }


def top_examples(
    store: ActivationStore, hook: str, neuron: int, k: Optional[int] = None, context: int = 8, text: Optional[TokenText] = None,
) -> list[dict[str, Any]]:
    """The neuron's k strongest activations (the store's online top-k), each with its context window."""
    column = int(check_neurons(store, hook, neuron)[0])
    state = store.stats(hook)
    text = text or TokenText(store)
    k = state.k if k is None else min(int(k), state.k)
    view = store.rows(hook)
    out = []
    for rank in range(k):
        doc = int(state.top_doc[rank, column])
        if doc < 0:
            break
        row = store.row_of(doc, int(state.top_pos[rank, column]))
        window = _window(store, row, context)
        out.append({"neuron": column, **_example(store, text, row, state.top_values[rank, column], window, view[window, column])})
    return out


def direction_examples(
    store: ActivationStore, hook: str, vector: Sequence[float], k: int = 20, context: int = 8,
    text: Optional[TokenText] = None, block_rows: int = BLOCK_ROWS,
) -> list[dict[str, Any]]:
    """The k rows with the largest x . vector (one streaming pass), each with its context window."""
    width = store.hook_info(check_hooks(store, hook)[0])["width"]
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if v.shape != (width,) or not np.isfinite(v).all():
        raise NeuronError(f"a direction of {hook} is a finite vector of {width} values, got shape {np.asarray(vector).shape}.")
    if k < 1:
        raise NeuronError(f"k must be at least 1, got {k}.")
    best_rows, best_values = np.empty(0, np.int64), np.empty(0)
    for block in iter_blocks(store, [hook], block_rows):
        proj = block.values[hook].astype(np.float64) @ v
        rows = np.concatenate([best_rows, np.arange(block.start, block.stop)])
        values = np.concatenate([best_values, proj])
        order = np.lexsort((rows, -values))[:k]
        best_rows, best_values = rows[order], values[order]
    text = text or TokenText(store)
    view = store.rows(hook)
    out = []
    for row, value in zip(best_rows, best_values):
        window = _window(store, int(row), context)
        out.append(_example(store, text, int(row), value, window, view[window].astype(np.float64) @ v))
    return out


def _scale(examples: Sequence[dict[str, Any]]) -> float:
    top = max((abs(v) for e in examples for v in e["values"]), default=0.0)
    return top or 1.0


SHADES = " ░▒▓█"


def examples_text(examples: Sequence[dict[str, Any]]) -> str:
    """One line per example: its value and place, then the tokens, each after its shade glyph."""
    scale = _scale(examples)
    lines = []
    for e in examples:
        parts = []
        for i, (tok, v) in enumerate(zip(e["tokens"], e["values"])):
            level = int(np.clip(np.floor(4 * max(v, 0.0) / scale + 1e-9), 0, 4))
            shown = tok.replace("\n", "\\n")
            parts.append(SHADES[level].strip() + (f"«{shown}»" if i == e["maxValueTokenIndex"] else shown))
        lines.append(f"{e['maxValue']:+.4g} doc {e['doc']} pos {e['pos']}: " + "".join(parts))
    return "\n".join(lines)


def examples_html(examples: Sequence[dict[str, Any]], title: str = "") -> str:
    """An HTML fragment: one row per example, each token's background shaded by its value."""
    scale = _scale(examples)
    rows = [f"<div class='examples'><h4>{html.escape(title)}</h4>"] if title else ["<div class='examples'>"]
    for e in examples:
        spans = []
        for i, (tok, v) in enumerate(zip(e["tokens"], e["values"])):
            alpha = min(1.0, abs(v) / scale)
            colour = f"rgba(255,120,0,{alpha:.3f})" if v >= 0 else f"rgba(0,100,255,{alpha:.3f})"
            border = ";outline:1px solid black" if i == e["maxValueTokenIndex"] else ""
            spans.append(f"<span style='background:{colour}{border};white-space:pre' title='{v:.4g}'>{html.escape(tok)}</span>")
        rows.append(f"<div><code>{e['maxValue']:+.4g}</code> <small>doc {e['doc']} pos {e['pos']}</small> <tt>{''.join(spans)}</tt></div>")
    rows.append("</div>")
    return "\n".join(rows)
