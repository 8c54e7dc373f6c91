"""index.html: the demo's run as a static page that opens from disk.

The same views as the viewer at /ui/ (the tokens coloured by a captured value, the layers ×
tokens heatmap, the attention pattern, the numbers per position), for this run only and
with no script: the server is gone when the demo ends, and a browser does not run ES
modules from file:// pages anyway. Every link is relative, so the folder can be moved.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np
from matplotlib.colors import to_hex

from .layout import (
    ATTENTION_PNG,
    ATTENTION_SVG,
    CAPTURE_FILE,
    INDEX_FILE,
    NEUROSCOPE_FILE,
    RESIDUAL_PNG,
    RESIDUAL_SVG,
    SMALLTALK_FILE,
    SUMMARY_FILE,
)
from .pictures import COLORMAP, attention_title, residual_title

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1b1f; max-width: 1400px; }
pre, .tokens, td.tok { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
pre { background: #f4f4f7; padding: 0.6rem; white-space: pre-wrap; }
.tokens { line-height: 1.9; white-space: pre-wrap; border: 1px solid #ddd; padding: 0.5rem; }
.tokens span { border-radius: 2px; box-shadow: inset -1px 0 0 #fff; }
.boundary { border-left: 3px solid #d62728; margin: 0 0.3rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 0.85rem; } th, td { border: 1px solid #ddd; padding: 0.1rem 0.4rem; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
.muted { color: #5d5d66; }
"""


def _color(value: float, low: float, high: float) -> tuple[str, str]:
    """Background (viridis, matplotlib's rule for a value in [0, 1]) and a legible ink."""
    unit = (value - low) / (high - low) if high > low else 0.0
    index = min(255, max(0, int(np.floor(unit * 256))))
    return to_hex(matplotlib.colormaps[COLORMAP](index)), "#000" if index > 150 else "#fff"


def _token_strip(tokens: Sequence[str], n_prompt: int, values: np.ndarray) -> str:
    low, high = float(values.min()), float(values.max())
    parts = []
    for pos, token in enumerate(tokens):
        if pos == n_prompt:
            parts.append('<span class="boundary" title="generation starts here"></span>')
        text = html.escape(token.replace("\n", "↵\n"))
        if pos < len(values):
            bg, ink = _color(float(values[pos]), low, high)
            title = html.escape(f"position {pos}: {values[pos]:.4g}", quote=True)
            parts.append(f'<span style="background:{bg};color:{ink}" title="{title}" data-value="{float(values[pos])!r}">{text}</span>')
        else:
            parts.append(f'<span title="position {pos}: never fed back, no activations">{text}</span>')
    return "".join(parts)


def _figure(svg: str, png: str, alt: str, caption: str) -> str:
    return (
        f'<figure><img src="{svg}" alt="{html.escape(alt, quote=True)}">'
        f'<figcaption class="muted">{html.escape(caption)} (<a href="{png}">PNG</a>, <a href="{svg}">SVG</a>)</figcaption></figure>'
    )


def write_index(
    folder: Path,
    *,
    model: str,
    viewer_url: str,
    prompt: str,
    text: str,
    reasoning: str,
    tokens: Sequence[str],
    n_prompt: int,
    norms: np.ndarray,
    pattern: Optional[tuple[int, Optional[str], bool]],
) -> Path:
    """Write index.html; `pattern` is (layer, layer type, rows exclude a sink) when one was drawn."""
    layers, positions = norms.shape
    last = layers - 1
    rows = []
    for pos, token in enumerate(tokens):
        source = "prompt" if pos < n_prompt else "generated"
        cells = "".join(f'<td class="num">{v:.4g}</td>' for v in norms[:, pos]) if pos < positions else f'<td colspan="{layers}">never fed back</td>'
        rows.append(f'<tr><td class="num">{pos}</td><td>{source}</td><td class="tok">{html.escape(repr(token)[1:-1])}</td>{cells}</tr>')
    attention = (
        _figure(ATTENTION_SVG, ATTENTION_PNG, attention_title(pattern[0], pattern[1]),
                "Every head of one layer; rows are queries, columns keys; grey cells are masked"
                + ("; rows exclude the sink's share (sink share = 1 − row sum)." if pattern[2] else "."))
        if pattern is not None else '<p class="muted">This model offers no attention pattern.</p>'
    )
    files = [SUMMARY_FILE, NEUROSCOPE_FILE, CAPTURE_FILE, SMALLTALK_FILE, RESIDUAL_PNG, RESIDUAL_SVG, ATTENTION_PNG, ATTENTION_SVG]
    # summary.md is written after this page (it describes this page too), so it is linked regardless.
    links = " · ".join(f'<a href="{name}">{name}</a>' for name in files if name == SUMMARY_FILE or (folder / name).exists())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mlx-engine demo, {html.escape(folder.name)}</title><style>{STYLE}</style></head>
<body>
<h1>mlx-engine demo, {html.escape(folder.name)}</h1>
<p>Model <code>{html.escape(model)}</code>. While the demo ran, its server's viewer was at <code>{html.escape(viewer_url)}</code>;
<code>mlx-engine serve</code> and <code>http://127.0.0.1:8080/ui/</code> give the same views live, for any prompt.</p>
<p>Files: {links}</p>
<h2>Prompt</h2><pre>{html.escape(prompt)}</pre>
<h2>Generated text</h2><pre>{html.escape(text)}</pre>
{f'<h2>Reasoning channel</h2><pre>{html.escape(reasoning)}</pre>' if reasoning else ''}
<h2>Tokens, coloured by the residual norm at layer {last}</h2>
<p class="muted">Viridis from the smallest ({norms[last].min():.4g}, dark) to the largest ({norms[last].max():.4g}, yellow); hover a token for
its value. The red bar marks where generation starts; the last token has no value (it is never fed back through the model).</p>
<div class="tokens">{_token_strip(tokens, n_prompt, norms[last])}</div>
<h2>Layers × tokens</h2>
{_figure(RESIDUAL_SVG, RESIDUAL_PNG, residual_title(model), "Residual stream norm per layer and token position, logarithmic colour scale")}
<h2>Attention</h2>
{attention}
<h2>Numbers per position</h2>
<table><thead><tr><th>position</th><th>source</th><th>token</th>{''.join(f'<th>layer {i}</th>' for i in range(layers))}</tr></thead>
<tbody>{''.join(rows)}</tbody></table>
</body></html>
"""
    path = folder / INDEX_FILE
    path.write_text(page, encoding="utf-8")
    return path
