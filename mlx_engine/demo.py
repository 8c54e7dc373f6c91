"""`mlx-engine demo`: one command that shows the whole product working on real data.

It loads a model, serves it on a free loopback port, asks it one question through the
official OpenAI client and the same question again as a stream through the NeuroScope
bridge, and leaves a new folder a newcomer can open: the capture as safetensors and as
NeuroScope JSON, the Smalltalk client for that server, two pictures drawn from the
captured numbers, and a summary describing every file. Every figure in the folder is
read back from what the server returned; nothing is made up for the occasion.

Both requests use greedy decoding, so they must produce the same tokens and the same
activations; the summary reports whether they did, which makes the demo a small
end-to-end check of the OpenAI path against the streaming path as well.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from .encoding import decode_capture

T = TypeVar("T")

DEFAULT_PROMPT = "Write a Python function that counts the lines in a text file."
DEFAULT_MAX_TOKENS = 24
DEFAULT_OUT_ROOT = "demo-output"
SMALLTALK_DIALECT = "pharo"

# Pixel geometry of the pictures; the test checks image sizes against these.
CELL = 16  # residual_norm.png: one CELL x CELL square per (layer, token position)
ATTENTION_CELL = 4  # attention_pattern.png: one square per (query, key) position pair
HEAD_GAP = 4  # white pixels between two heads in attention_pattern.png
HEADS_PER_ROW = 8  # attention_pattern.png wraps to a new row of heads after this many

NEUROSCOPE_FILE = "neuroscope.json"
CAPTURE_FILE = "capture.safetensors"
SMALLTALK_FILE = "NeuroScopeMLXClient.st"
RESIDUAL_PNG = "residual_norm.png"
ATTENTION_PNG = "attention_pattern.png"
SUMMARY_FILE = "summary.md"

# Perceptually ordered anchors of the viridis colormap (dark purple -> yellow).
_VIRIDIS = np.array(
    [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
     [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]],
    dtype=np.float64,
)
_NOT_ATTENDED = (40, 40, 40)  # key positions a query cannot see (future, or outside the window)
_BACKGROUND = (255, 255, 255)


# ----------------------------------------------------------------------------- hooks


@dataclass(frozen=True)
class DemoHooks:
    """What the demo captures, named from the model's own hook-point listing."""

    residual: list[str]  # hook ids, one per layer, in layer order
    pattern: Optional[str]  # the attention_pattern hook id, if the model offers one
    pattern_layer: Optional[int] = None
    pattern_layer_type: Optional[str] = None

    def requests(self) -> list[dict[str, Any]]:
        """The `activation_hooks` of both requests."""
        hooks: list[dict[str, Any]] = []
        for hook_id in self.residual:
            layer_name, component = hook_id.rsplit(".", 1)
            hooks.append({"layer_name": layer_name, "component": component, "hook_id": hook_id})
        if self.pattern is not None:
            layer_name, component = self.pattern.rsplit(".", 1)
            hooks.append({"layer_name": layer_name, "component": component, "hook_id": self.pattern})
        return hooks

    @property
    def all_ids(self) -> list[str]:
        return self.residual + ([self.pattern] if self.pattern else [])


def choose_hooks(hook_points: Mapping[str, Any]) -> DemoHooks:
    """Residual of every layer, and the attention pattern of the last full-attention layer.

    Full attention is preferred because its pattern spans the whole sequence; a model
    made only of sliding-window layers falls back to its last layer offering patterns.
    """
    layers = hook_points["layers"]
    residual = [layer["components"]["residual"]["hook_id"] for layer in layers if "residual" in layer["components"]]
    if len(residual) != len(layers):
        raise ValueError(f"Model {hook_points.get('model')!r} does not offer the residual stream of every layer.")
    with_pattern = [layer for layer in layers if "attention_pattern" in layer["components"]]
    full = [layer for layer in with_pattern if layer.get("attention_type") == "full_attention"]
    chosen = (full or with_pattern or [None])[-1]
    if chosen is None:
        return DemoHooks(residual, None)
    return DemoHooks(
        residual,
        chosen["components"]["attention_pattern"]["hook_id"],
        chosen["layer"],
        chosen.get("attention_type"),
    )


# ----------------------------------------------------------------------------- output folder


def new_run_folder(out_root: Path, now: Optional[datetime] = None) -> Path:
    """Create `<out_root>/<YYYYmmdd-HHMMSS>[-N]`; an existing folder is never reused.

    `mkdir` without `exist_ok` is the atomic test, so two demos started in the same
    second (or at once) still get a folder each.
    """
    if out_root.exists() and not out_root.is_dir():
        raise ValueError(f"--out-root {out_root} exists and is not a folder.")
    out_root.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    n = 1
    while True:
        folder = out_root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


# ----------------------------------------------------------------------------- server


def _with_elapsed(desc: str, fn: Callable[[], T]) -> T:
    """Run `fn` while a progress line counts the seconds: loading reports no finer progress."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool, tqdm(
        desc=desc, bar_format="{desc}: {elapsed}", file=sys.stderr
    ) as bar:
        future = pool.submit(fn)
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                bar.refresh()


@contextmanager
def serving(target: str, model_id: str) -> Iterator[str]:
    """Load `target` into a real mlx-engine server on a free 127.0.0.1 port; yield its base URL.

    The model is loaded through the server's own state (on its engine thread, which
    must own the MLX arrays) under `model_id`, so the requests can name it as the user
    did. Leaving the block stops the HTTP server and then the engine thread.
    """
    from .api_server import ServerConfig, create_app, make_server
    from .api_server.state import EXTENSION_KEY

    config = ServerConfig(model=None, host="127.0.0.1", port=0, threads=4)
    app = create_app(config)
    state = app.extensions[EXTENSION_KEY]
    # Binding before loading gives waitress's worker threads time to become idle, so the
    # first request is not reported as queued.
    server = make_server(app, config)
    thread = threading.Thread(target=server.run, name="mlx-engine-demo-server", daemon=True)
    try:
        _with_elapsed(f"loading model {model_id}", lambda: state.load(target, model_id))
        thread.start()
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        if thread.is_alive():
            thread.join(timeout=10)
        state.engine.stop()


# ----------------------------------------------------------------------------- requests


def chat_through_openai(base_url: str, model_id: str, prompt: str, hooks: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """A whole chat completion with activations, asked with the official `openai` client.

    The activation fields ride in `extra_body` on the way in and come back as extra
    fields of the SDK's response object, which `model_dump` keeps.
    """
    from openai import OpenAI

    # The demo server has no API key; the SDK insists on one, and the server ignores it.
    # Closing the client closes its kept-alive connection, which lets the server shut down at once.
    with OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600.0) as client:
        completion = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"activation_hooks": hooks, "activation_format": "base64"},
        )
    return completion.model_dump()


def stream_with_progress(base_url: str, model_id: str, prompt: str, hooks: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """The same chat streamed from /v1/chat/completions/with_activations, one progress tick per token."""
    from .integrations.neuroscope.client import NeuroScopeClient

    client = NeuroScopeClient(base_url)
    client.model = model_id
    stream = client.generate_with_activations(
        prompt, hooks, stream=True, activation_format="base64", max_tokens=max_tokens, temperature=0.0
    )
    with tqdm(total=max_tokens, desc="streaming tokens", unit="tok", file=sys.stderr) as bar:
        for chunk in stream:  # type: ignore[union-attr]
            if chunk.token_id is not None:
                bar.update(1)
                bar.set_postfix_str(repr(chunk.token_text), refresh=False)
    return stream.response()  # type: ignore[union-attr]


def download_capture(base_url: str, capture_id: str, dest: Path) -> int:
    """Fetch the whole capture as safetensors from the server's capture store; bytes written."""
    url = f"{base_url}/v1/activations/captures/{urllib.parse.quote(capture_id, safe='')}"
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    dest.write_bytes(data)
    return len(data)


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
    timings: dict[str, float] = field(default_factory=dict)

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
        f"Served by a real mlx-engine server at {run.base_url} (a free loopback port; the server stopped when the demo ended).",
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
    lines += _residual_section(run, size[RESIDUAL_PNG])
    lines += _attention_section(run, size.get(ATTENTION_PNG))
    lines += [f"### {SUMMARY_FILE}", "", "This file.", ""]
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
        f"{len(header)} tensors named `{{hook_id}}/step{{step}}/chunk{{i}}`, each tensor's wire metadata as JSON in the "
        f"header, and `user_metadata` holding {', '.join(f'`{k}`' for k in user)}. It holds the same values as "
        f"{NEUROSCOPE_FILE}.",
        "",
        "| hook | tensors | dtype | bytes | shapes |",
        "|---|---|---|---|---|",
    ]
    for hook_id in hooks.all_ids:
        names = sorted((n for n in header if n.startswith(hook_id + "/")), key=lambda n: int(n.split("/")[1][4:]))
        dtypes = sorted({header[n]["dtype"] for n in names})
        nbytes = sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)
        shapes = [header[n]["shape"] for n in names]
        described = (
            f"first {shapes[0]}, last {shapes[-1]}" if hook_id == hooks.pattern and shapes else _steps_text(shapes)
        )
        lines.append(f"| `{hook_id}` | {len(names)} | {', '.join(dtypes)} | {nbytes} | {described} |")
    return lines + [""]


def _residual_section(run: DemoRun, nbytes: int) -> list[str]:
    layers, positions = run.norms.shape
    means = ", ".join(f"layer {i}: {m:.3g}" for i, m in enumerate(run.norms.mean(axis=1)))
    return [
        f"### {RESIDUAL_PNG} ({nbytes} bytes, {positions * CELL} x {layers * CELL} pixels)",
        "",
        f"The L2 norm of the residual stream (each layer's block output) per layer and token position: one "
        f"{CELL} x {CELL} pixel cell each, so the image is positions x {CELL} = {positions * CELL} pixels wide and "
        f"layers x {CELL} = {layers * CELL} pixels high. Rows are layers, layer 0 at the top and layer {layers - 1} at "
        f"the bottom; columns are token positions 0 to {positions - 1}, left to right (the token table below names "
        "them). Colour is viridis on a logarithmic scale shared by all layers: dark purple is the smallest norm "
        f"({run.residual_scale.low:.4g}), yellow the largest ({run.residual_scale.high:.4g}).",
        "",
        f"Mean norm per layer: {means}.",
        "",
    ]


def _attention_section(run: DemoRun, nbytes: Optional[int]) -> list[str]:
    if run.pattern_shape is None or nbytes is None:
        return [f"### {ATTENTION_PNG}", "", "Not written: the model offers no attention_pattern hook point.", ""]
    heads, n, _ = run.pattern_shape
    width, height = attention_png_size(heads, n)
    _, rows = attention_layout(heads)
    return [
        f"### {ATTENTION_PNG} ({nbytes} bytes, {width} x {height} pixels)",
        "",
        f"The attention pattern (softmax probabilities, sink mass excluded) of layer {run.hooks.pattern_layer} "
        f"(`{run.hooks.pattern}`, {run.hooks.pattern_layer_type}), every head shown separately (no averaging): {heads} "
        f"squares in {rows} row(s) of up to {HEADS_PER_ROW}, head 0 at the top left and numbered left to right, then "
        f"top to bottom, {HEAD_GAP} white pixels between heads. In each square, row q is the query at position q (top "
        f"to bottom) and column k the key at position k (left to right), {n} x {n} positions of "
        f"{ATTENTION_CELL} x {ATTENTION_CELL} pixels. The prompt's rows come from step 0, each later row from the "
        "step that generated the next token; columns are placed by the capture's `key_positions`. Colour is viridis of "
        "the square root of the probability (dark purple 0, yellow 1); dark grey marks keys the mask hides from the "
        "query (later positions, and positions outside a sliding window), whose probability is 0 by construction.",
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


# ----------------------------------------------------------------------------- the demo


def _check_inputs(prompt: str, max_tokens: int) -> None:
    if not prompt.strip():
        raise ValueError("--prompt must not be empty.")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}.")
    from .api_server import ServerConfig

    limit = ServerConfig().max_tokens_limit
    if max_tokens > limit:
        raise ValueError(f"--max-tokens must be at most {limit}, the server's limit; got {max_tokens}.")


def demo(
    model: str = "default",
    out_root: str | Path = DEFAULT_OUT_ROOT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt: str = DEFAULT_PROMPT,
) -> DemoRun:
    """Run the demo and answer everything it found; `run_demo` answers just the folder."""
    from .integrations.neuroscope.client import NeuroScopeClient
    from .integrations.neuroscope.format import convert_activations_for_neuroscope
    from .integrations.neuroscope.smalltalk import generate_smalltalk_client
    from .model_kit import resolve_model_path

    _check_inputs(prompt, max_tokens)
    started = datetime.now()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tqdm.write(f"mlx-engine demo: model {model!r}", file=sys.stderr)
    # Resolving first turns a bad name into a clear error before anything starts, and shows
    # the Hub's own download progress when the model is not cached yet.
    path, model_id = resolve_model_path(model)
    timings["resolve model"] = time.perf_counter() - t0

    with serving(str(path), model_id) as base_url:
        timings["load model"] = time.perf_counter() - t0 - timings["resolve model"]
        tqdm.write(f"serving {model_id} at {base_url}", file=sys.stderr)
        hook_points = NeuroScopeClient(base_url).hook_points(model_id)
        hooks = choose_hooks(hook_points)
        request = hooks.requests()

        t = time.perf_counter()
        tqdm.write("chat completion through the openai client ...", file=sys.stderr)
        openai_body = chat_through_openai(base_url, model_id, prompt, request, max_tokens)
        timings["openai client request"] = time.perf_counter() - t

        t = time.perf_counter()
        streamed = stream_with_progress(base_url, model_id, prompt, request, max_tokens)
        timings["streamed request"] = time.perf_counter() - t

        capture_id = streamed.get("capture_id")
        if not capture_id:
            raise RuntimeError("The server named no capture_id for the streamed request; the capture was not stored.")
        folder = new_run_folder(Path(out_root), started)
        download_capture(base_url, capture_id, folder / CAPTURE_FILE)

    t = time.perf_counter()
    neuroscope = convert_activations_for_neuroscope(streamed)
    (folder / NEUROSCOPE_FILE).write_text(json.dumps(neuroscope, ensure_ascii=False), encoding="utf-8")
    source = generate_smalltalk_client(SMALLTALK_DIALECT, base_url)
    (folder / SMALLTALK_FILE).write_text(source, encoding="utf-8")

    norms = residual_norms(neuroscope, hooks.residual)
    scale = write_residual_png(norms, folder / RESIDUAL_PNG)
    pattern_shape = None
    if hooks.pattern is not None:
        layer = hook_points["layers"][hooks.pattern_layer]
        grid = attention_grid(neuroscope["activations"][hooks.pattern], layer.get("window"))
        write_attention_png(grid, folder / ATTENTION_PNG)
        pattern_shape = grid.shape
    timings["write files"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    run = DemoRun(
        folder=folder,
        model_id=model_id,
        source=model,
        base_url=base_url,
        prompt=prompt,
        max_tokens=max_tokens,
        hooks=hooks,
        hook_points=hook_points,
        streamed=streamed,
        openai_body=openai_body,
        neuroscope=neuroscope,
        smalltalk_chars=len(source),
        residual_scale=scale,
        norms=norms,
        pattern_shape=pattern_shape,
        timings=timings,
    )
    write_summary(run)
    return run


def run_demo(
    model: str = "default",
    out_root: str | Path = DEFAULT_OUT_ROOT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    prompt: str = DEFAULT_PROMPT,
) -> Path:
    """Run the whole demo (see the module docstring) and answer the new output folder."""
    return demo(model=model, out_root=out_root, max_tokens=max_tokens, prompt=prompt).folder


# ----------------------------------------------------------------------------- command line


def _run(args: argparse.Namespace) -> int:
    run = demo(model=args.model, out_root=args.out_root, max_tokens=args.max_tokens, prompt=args.prompt)
    print(f"model:     {run.model_id}")
    print(f"prompt:    {run.prompt!r}")
    if run.reasoning:
        print(f"reasoning: {run.reasoning!r}")
    print(f"generated: {run.text!r}")
    print(f"hooks:     {', '.join(run.hooks.all_ids)}")
    for p in sorted(run.folder.iterdir()):
        print(f"  {p.name:<26} {p.stat().st_size:>10} bytes")
    print(f"finished in {run.timings['total']:.1f} s; open {SUMMARY_FILE} first. Output folder:")
    print(run.folder)
    return 0


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    """`mlx-engine demo [--model M] [--out-root DIR] [--prompt TEXT] [--max-tokens N]`."""
    p = sub.add_parser(
        "demo",
        help="serve a model, capture activations through the OpenAI and NeuroScope clients, and write a folder of results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="local folder, Hugging Face repo id, or 'default' (the embedded model)")
    p.add_argument("--out-root", default=DEFAULT_OUT_ROOT, help=f"folder that receives one new timestamped folder per run ({DEFAULT_OUT_ROOT})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"tokens to generate ({DEFAULT_MAX_TOKENS})")
    p.set_defaults(func=_run)
