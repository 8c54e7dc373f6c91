"""Captures given as the source of a `mean` or `patch`, read as numpy rows with their positions.

A source may be a Capture (rows at its own positions), a list of Captures (one
generation's steps, contiguous), a ActivationCache or any object with an `activations`
mapping (the capture named by `capture_hook`, by default the intervention's own hook
id), a list of those, or an array (rows at positions 0..T-1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..hooks.capture import Capture
from .resolve import Piece
from .spec import as_array, intervention_error


def _numpy(value: Any, index: int, field: str) -> np.ndarray:
    if isinstance(value, mx.array):
        value = np.array(value.astype(mx.float32))
    return as_array(value, index, field)


def source_pieces(source: Any, capture_hook: Optional[str], default_id: str, index: int, field: str) -> list[Piece]:
    """A source as (rows, first position) pieces: arrays start at 0, captures at their positions."""
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, Capture) or hasattr(s, "activations") for s in source):
        out: list[Piece] = []
        for s in source:
            out.extend(source_pieces(s, capture_hook, default_id, index, field))
        return out
    if isinstance(source, Capture):
        return [(_numpy(source.array, index, field), source.positions[0])]
    activations = getattr(source, "activations", None)
    if isinstance(activations, Mapping):
        key = capture_hook or default_id
        if key not in activations:
            held = ", ".join(sorted(activations)) or "nothing"
            if capture_hook is not None and field == "capture_id":
                raise intervention_error(index, "capture_hook", f"the capture holds no hook {key!r}; it holds: {held}.")
            raise intervention_error(index, "capture_id", f"the source has no capture {key!r}; it holds: {held}.")
        return source_pieces(activations[key], None, default_id, index, field)
    return [(_numpy(source, index, field), 0)]
