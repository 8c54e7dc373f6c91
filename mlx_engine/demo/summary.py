"""summary.md: every file of a demo run described from the data it holds."""

from __future__ import annotations

import json
import struct
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..wire.codec import decode_capture
from ..wire.files import parse_tensor_key
from .layout import (
    ATTENTION_PNG,
    ATTENTION_SVG,
    CAPTURE_FILE,
    INDEX_FILE,
    NEUROSCOPE_FILE,
    RESIDUAL_PNG,
    RESIDUAL_SVG,
    SMALLTALK_DIALECT,
    SMALLTALK_FILE,
    SUMMARY_FILE,
    DemoHooks,
)
from .pictures import ResidualScale, attention_layout, attention_title, residual_title

# ----------------------------------------------------------------------------- files described


def safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor name -> {dtype, shape, data_offsets}, the `__metadata__` strings) of a file.

    Read from the header itself so the summary works for every dtype, bfloat16 included.
    """
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    metadata = header.pop("__metadata__", {})
    return header, metadata


def _steps_text(shapes: list[list[int]]) -> str:
    """'step 0: [58, 256]; steps 1-23: [1, 256]'-style description of per-step shapes."""
    parts: list[str] = []
    i = 0
    while i < len(shapes):
        j = i
        while j + 1 < len(shapes) and shapes[j + 1] == shapes[i]:
            j += 1
        if j == i:
            parts.append(f"step {i}: {shapes[i]}")
        else:
            parts.append(f"steps {i}-{j}: {shapes[i]}")
        i = j + 1
    return "; ".join(parts)


def _pattern_shapes(entries: Sequence[Mapping[str, Any]]) -> str:
    first, last = entries[0]["shape"], entries[-1]["shape"]
    if len(entries) == 1:
        return f"step 0: {first}"
    return f"step 0: {first}; steps 1-{len(entries) - 1}: [{first[0]}, 1, S] with S growing to {last[2]}"


def _fence(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def _md_code(text: str) -> str:
    """A token as a Markdown table cell: inline code, control characters spelled out."""
    shown = text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace("|", "\\|")
    ticks = "``" if "`" in shown else "`"
    pad = " " if shown.startswith("`") or shown.endswith("`") else ""
    return f"{ticks}{pad}{shown}{pad}{ticks}"


@dataclass
class DemoRun:
    """Everything the summary and the command's recap are written from."""

    folder: Path
    model_id: str
    source: str
    base_url: str
    prompt: str
    max_tokens: int
    hooks: DemoHooks
    hook_points: dict[str, Any]
    streamed: dict[str, Any]
    openai_body: dict[str, Any]
    neuroscope: dict[str, Any]
    smalltalk_chars: int
    residual_scale: ResidualScale
    norms: np.ndarray
    pattern_shape: Optional[tuple[int, int, int]]
    pattern_sinks: bool = False  # the pattern's rows sum to less than 1: a sink took the rest
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def viewer_url(self) -> str:
        """The viewer of the demo's server (live only while the demo runs)."""
        return f"{self.base_url}/ui/"

    @property
    def text(self) -> str:
        return self.streamed["choices"][0]["message"]["content"] or ""

    @property
    def reasoning(self) -> str:
        return self.streamed["choices"][0]["message"].get("reasoning_content") or ""

    @property
    def positions(self) -> int:
        return int(self.norms.shape[1])


def compare_paths(openai_body: Mapping[str, Any], streamed: Mapping[str, Any], hook_ids: Sequence[str]) -> dict[str, Any]:
    """Do the OpenAI-client answer and the streamed one agree (tokens, and captures value by value)?"""
    same_tokens = openai_body.get("generated_token_ids") == streamed.get("generated_token_ids")
    worst = 0.0
    for hook_id in hook_ids:
        a = openai_body["activations"][hook_id]
        b = streamed["activations"][hook_id]
        if [c["shape"] for c in a] != [c["shape"] for c in b]:
            return {"same_tokens": same_tokens, "max_abs_diff": None}
        for ca, cb in zip(a, b):
            xa, xb = decode_capture(ca), decode_capture(cb)
            if xa is not None and xb is not None and xa.size:
                worst = max(worst, float(np.nanmax(np.abs(xa.astype(np.float64) - xb.astype(np.float64)))))
    return {"same_tokens": same_tokens, "max_abs_diff": worst}


def write_summary(run: DemoRun) -> Path:
    """summary.md: what was run, what came back, and every file with its shapes, dtypes and sizes."""
    folder = run.folder
    ns = run.neuroscope
    hp = run.hook_points
    agreement = compare_paths(run.openai_body, run.streamed, run.hooks.all_ids)
    prompt_tokens = ns["prompt_tokens"]
    generated = ns["generated_tokens"]
    size = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    lines: list[str] = [
        f"# mlx-engine demo, {folder.name}",
        "",
        f"Model `{run.model_id}`{'' if run.source == run.model_id else f' (from `{run.source}`)'}: {hp.get('model_type')}, {hp['num_layers']} layers, "
        f"d_model {hp.get('d_model')}, {hp.get('n_heads')} attention heads ({hp.get('n_kv_heads')} key/value heads), "
        f"native implementation: {hp.get('native')}.",
        f"Served by a real mlx-engine server at {run.base_url} (a free loopback port; the server stopped when the demo ended). "
        f"Its viewer was at {run.viewer_url} while the demo ran; `mlx-engine serve` and http://127.0.0.1:8080/ui/ give the same "
        f"views live, for any prompt. {INDEX_FILE} shows this run's views offline, in a browser.",
        "",
        "## The request",
        "",
        f"Prompt (one user message, greedy decoding, at most {run.max_tokens} new tokens):",
        "",
        _fence(run.prompt),
        "",
        f"Generated text (finish reason `{run.streamed['choices'][0].get('finish_reason')}`):",
        "",
        _fence(run.text),
        "",
    ]
    if run.reasoning:
        lines += ["Reasoning channel:", "", _fence(run.reasoning), ""]
    lines += [
        f"The chat template made {len(prompt_tokens)} prompt tokens; the model generated {len(generated)} tokens. "
        f"Activations exist for {run.positions} positions: the prompt plus every generated token except the last, "
        "which is never fed back through the model.",
        "",
        "It was asked twice:",
        "",
        f"1. with the official `openai` Python client, `chat.completions.create(..., extra_body={{\"activation_hooks\": ...}})` "
        f"against `/v1/chat/completions` (capture `{run.openai_body.get('capture_id')}`, "
        f"usage {json.dumps(run.openai_body.get('usage', {}).get('total_tokens'))} tokens in total);",
        f"2. streamed from `/v1/chat/completions/with_activations` with the NeuroScope bridge's Python client "
        f"(`activation_format: base64`, capture `{run.streamed.get('capture_id')}`). The files below come from this request.",
        "",
        f"Same generated tokens on both paths: {'yes' if agreement['same_tokens'] else 'no'}; largest absolute "
        "difference between their captured values: "
        + ("not comparable, the capture shapes differ." if agreement["max_abs_diff"] is None else f"{agreement['max_abs_diff']}."),
        "",
        "## Hooks",
        "",
        "Chosen from the model's own listing (`GET /v1/models/{id}/hook_points`):",
        "",
    ]
    for hook in run.hooks.requests():
        lines.append(f"- `{hook['hook_id']}`: layer `{hook['layer_name']}`, component `{hook['component']}`")
    if run.hooks.pattern is None:
        lines.append("- no attention pattern: this model offers no `attention_pattern` hook point.")
    else:
        lines.append(
            f"\nThe attention pattern is layer {run.hooks.pattern_layer}'s ({run.hooks.pattern_layer_type}), "
            "the last full-attention layer when the model has one."
        )
    lines += ["", "## Files", ""]
    lines += _neuroscope_section(ns, run.hooks, size[NEUROSCOPE_FILE])
    lines += _capture_section(folder / CAPTURE_FILE, run.hooks)
    lines += [
        f"### {SMALLTALK_FILE} ({size[SMALLTALK_FILE]} bytes)",
        "",
        f"The NeuroScope client for Smalltalk, {SMALLTALK_DIALECT.capitalize()} dialect ({run.smalltalk_chars} characters of "
        f"file-in source: classes `NeuroScopeMLXClient`, `LMStudioRESTClient`, `NeuroScopeMLXClientTest`). "
        f"`NeuroScopeMLXClient default` talks to {run.base_url}; serve a model there again with "
        f"`mlx-engine serve --model {run.source} --port {urllib.parse.urlsplit(run.base_url).port}`, "
        "or point it elsewhere with `baseUrl:`.",
        "",
    ]
    lines += _residual_section(run, size[RESIDUAL_PNG], size[RESIDUAL_SVG])
    lines += _attention_section(run, size.get(ATTENTION_PNG), size.get(ATTENTION_SVG))
    lines += [
        f"### {INDEX_FILE} ({size[INDEX_FILE]} bytes)",
        "",
        "The same views as a static page that opens from disk (relative links only, no script): the tokens coloured by "
        "the last layer's residual norm, both pictures (as SVG) and the numbers per position.",
        "",
        f"### {SUMMARY_FILE}",
        "",
        "This file.",
        "",
    ]
    lines += _token_table(run)
    if run.timings:
        lines += ["## Timings", ""]
        lines += [f"- {name}: {seconds:.2f} s" for name, seconds in run.timings.items()]
        lines.append("")
    path = folder / SUMMARY_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _neuroscope_section(ns: Mapping[str, Any], hooks: DemoHooks, nbytes: int) -> list[str]:
    lines = [
        f"### {NEUROSCOPE_FILE} ({nbytes} bytes)",
        "",
        f"The streamed response in NeuroScope's activation format (`format: {ns['format']}`, version {ns['version']}): "
        "the tokens as strings and ids, and per hook a list of captures in step order, each with its shape, dtype, "
        "absolute positions `[start, end)` and its values as one flat row-major list.",
        "",
        "| hook | captures | dtype | shapes |",
        "|---|---|---|---|",
    ]
    for hook_id in hooks.all_ids:
        entries = ns["activations"][hook_id]
        shapes = _pattern_shapes(entries) if hook_id == hooks.pattern else _steps_text([e["shape"] for e in entries])
        dtypes = sorted({e["dtype"] for e in entries})
        lines.append(f"| `{hook_id}` | {len(entries)} | {', '.join(dtypes)} | {shapes} |")
    return lines + [""]


def _capture_section(path: Path, hooks: DemoHooks) -> list[str]:
    header, metadata = safetensors_header(path)
    user = json.loads(metadata.get("user_metadata", "{}"))
    lines = [
        f"### {CAPTURE_FILE} ({path.stat().st_size} bytes)",
        "",
        f"The whole capture as the server stored it, downloaded from `GET /v1/activations/captures/{user.get('capture_id')}`: "
        f"{len(header)} tensors named `{{hook_id}}/step{{step:06d}}/chunk{{i:04d}}` (zero-padded, so names sort in step order), each tensor's wire metadata as JSON in the "
        f"header, and `user_metadata` holding {', '.join(f'`{k}`' for k in user)}. It holds the same values as "
        f"{NEUROSCOPE_FILE}.",
        "",
        "| hook | tensors | dtype | bytes | shapes |",
        "|---|---|---|---|---|",
    ]
    for hook_id in hooks.all_ids:
        keys = {n: parse_tensor_key(n) for n in header if n.startswith(hook_id + "/")}
        names = sorted((n for n, k in keys.items() if k is not None and k[3] is None), key=lambda n: keys[n][1:3])  # type: ignore[index]
        dtypes = sorted({header[n]["dtype"] for n in names})
        nbytes = sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)
        shapes = [header[n]["shape"] for n in names]
        described = (
            f"first {shapes[0]}, last {shapes[-1]}" if hook_id == hooks.pattern and shapes else _steps_text(shapes)
        )
        lines.append(f"| `{hook_id}` | {len(names)} | {', '.join(dtypes)} | {nbytes} | {described} |")
    return lines + [""]


def _residual_section(run: DemoRun, png_bytes: int, svg_bytes: int) -> list[str]:
    layers, positions = run.norms.shape
    means = ", ".join(f"layer {i}: {m:.3g}" for i, m in enumerate(run.norms.mean(axis=1)))
    return [
        f"### {RESIDUAL_PNG} ({png_bytes} bytes) and {RESIDUAL_SVG} ({svg_bytes} bytes)",
        "",
        f"\"{residual_title(run.model_id)}\": the L2 norm of the residual stream (each layer's block output) per layer "
        f"and token position, a heatmap with layer numbers 0 to {layers - 1} down the side (layer 0 at the top) and the "
        f"{positions} token strings along the bottom, position 0 at the left (the token table below numbers them). A red "
        f"line marks where generation starts (before position {len(run.neuroscope['prompt_tokens'])}). Colour is viridis on "
        f"a logarithmic scale shared by all layers, with its colour bar: dark purple is the smallest norm "
        f"({run.residual_scale.low:.4g}), yellow the largest ({run.residual_scale.high:.4g}). The SVG is the same figure "
        "with its text as text.",
        "",
        f"Mean norm per layer: {means}.",
        "",
    ]


def _attention_section(run: DemoRun, png_bytes: Optional[int], svg_bytes: Optional[int]) -> list[str]:
    if run.pattern_shape is None or png_bytes is None:
        return [f"### {ATTENTION_PNG}", "", "Not written: the model offers no attention_pattern hook point.", ""]
    heads, n, _ = run.pattern_shape
    columns, rows = attention_layout(heads)
    sinks = (
        "This model has attention sinks: each row excludes the sink's share, so rows sum to less than 1, and the "
        "sink's share of a row is 1 - its sum (the figure says so in its title)."
        if run.pattern_sinks
        else "Rows sum to 1: no sink takes a share."
    )
    return [
        f"### {ATTENTION_PNG} ({png_bytes} bytes) and {ATTENTION_SVG} ({svg_bytes} bytes)",
        "",
        f"\"{attention_title(run.hooks.pattern_layer, run.hooks.pattern_layer_type)}\": the attention pattern (softmax "
        f"probabilities) of layer {run.hooks.pattern_layer} (`{run.hooks.pattern}`), every head in its own panel (no "
        f"averaging), titled head 0 to head {heads - 1}, {columns} per row in {rows} row(s). In each panel row q is the "
        f"query at position q (top to bottom) and column k the key at position k (left to right), {n} x {n} positions "
        "labelled with their token strings; red lines mark where generation starts. The prompt's rows come from step 0, "
        "each later row from the step that generated the next token; columns are placed by the capture's "
        "`key_positions`. Colour is viridis of the probability on a square-root scale (its colour bar is labelled in "
        "probabilities); grey marks keys the mask hides from the query (later positions, and positions outside a "
        f"sliding window). {sinks}",
        "",
    ]


def _token_table(run: DemoRun) -> list[str]:
    ns = run.neuroscope
    tokens = list(ns["prompt_tokens"]) + list(ns["generated_tokens"])
    n_prompt = len(ns["prompt_tokens"])
    layers = run.norms.shape[0]
    lines = [
        "## Token positions",
        "",
        "Residual-stream norms per position (the numbers behind residual_norm.png).",
        "",
        "| position | source | token | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
        "|---|---|---|" + "---|" * layers,
    ]
    for pos, token in enumerate(tokens):
        source = "prompt" if pos < n_prompt else "generated"
        if pos < run.positions:
            norms = " | ".join(f"{v:.4g}" for v in run.norms[:, pos])
        else:
            norms = " | ".join("(not fed back)" for _ in range(layers))
        lines.append(f"| {pos} | {source} | {_md_code(token)} | {norms} |")
    return lines + [""]

