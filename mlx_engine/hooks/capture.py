"""One captured tensor and the facts needed to place it in the token stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..wire.fields import CAPTURE_FIELDS


def mlx_dtype_name(array: mx.array) -> str:
    """The wire name of an MLX array's dtype (`float32`, `bfloat16`, `uint32`, ...)."""
    return str(array.dtype).replace("mlx.core.", "")


def mlx_to_numpy(array: mx.array) -> tuple[np.ndarray, str]:
    """The array's bytes as numpy, and its wire dtype; bfloat16 comes back as its uint16 pattern.

    numpy cannot hold bfloat16, so the array is reinterpreted as uint16 first: the bits
    are what the base64 encoding sends.
    """
    name = mlx_dtype_name(array)
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array), name


@dataclass
class Capture:
    """What hook `hook_id` saw in one forward pass (one prefill chunk or one decode step).

    `array` has the batch axis removed and is evaluated together with the pass's logits.
    `positions` are the absolute token positions [start, end) of its rows (for q/k/v/z
    and scores/patterns, of axis 1). `key_positions` give the absolute position of
    each key column of scores and patterns. `extras` holds companions of the main
    tensor (the router's chosen `experts` and their `weights`).
    """

    hook_id: str
    layer_name: str
    layer: Optional[int]
    component: str
    step: int
    positions: tuple[int, int]
    is_input: bool
    array: mx.array
    key_positions: Optional[list[int]] = None
    extras: dict[str, mx.array] = field(default_factory=dict)
    # For a capture taken where an intervention also acts: "before" or "after" the edit.
    edit: Optional[str] = None
    # For a capture of a feature subset: the indices (along the last axis) of its columns.
    indices: Optional[list[int]] = None
    # For a capture of a position subset: the absolute position of each of its rows.
    row_positions: Optional[list[int]] = None

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    @property
    def dtype(self) -> str:
        return mlx_dtype_name(self.array)

    def metadata(self) -> dict[str, Any]:
        """The wire metadata (wire/fields.py), without the data."""
        meta: dict[str, Any] = {}
        for f in CAPTURE_FIELDS:
            value = getattr(self, f.name)
            if f.name == "positions":
                value = list(value)
            if f.optional and value is None:
                continue
            meta[f.name] = value
        return meta

    def wire_arrays(self) -> dict[str, tuple[np.ndarray, str]]:
        """The main tensor (under "data") and each extra as (numpy bytes, wire dtype), for the codec."""
        out = {"data": mlx_to_numpy(self.array)}
        for name, extra in self.extras.items():
            out[name] = mlx_to_numpy(extra)
        return out

    def lazy_arrays(self) -> list[mx.array]:
        """Every MLX array this capture holds, for evaluating it together with its pass."""
        arrays = [self.array, *self.extras.values()]
        if isinstance(self.key_positions, mx.array):
            arrays.append(self.key_positions)
        return arrays

    def settle(self) -> None:
        """After evaluation: key positions become a plain list (what the wire carries)."""
        if isinstance(self.key_positions, mx.array):
            self.key_positions = self.key_positions.tolist()


# hook id -> the captures of one step, in pass order (the prompt may span several chunks).
StepActivations = dict[str, list[Capture]]
