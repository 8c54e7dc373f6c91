"""Where a demo run writes, and what it captures: file names, hook choice, a new folder per run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

DEFAULT_PROMPT = "Write a Python function that counts the lines in a text file."
DEFAULT_MAX_TOKENS = 24
DEFAULT_OUT_ROOT = "demo-output"

SMALLTALK_DIALECT = "pharo"

NEUROSCOPE_FILE = "neuroscope.json"
CAPTURE_FILE = "capture.safetensors"
SMALLTALK_FILE = "NeuroScopeMLXClient.st"
RESIDUAL_PNG = "residual_norm.png"
RESIDUAL_SVG = "residual_norm.svg"
ATTENTION_PNG = "attention_pattern.png"
ATTENTION_SVG = "attention_pattern.svg"
SUMMARY_FILE = "summary.md"
INDEX_FILE = "index.html"


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

