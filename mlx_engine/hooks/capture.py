"""One captured tensor and the facts needed to place it in the token stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx


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

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    @property
    def dtype(self) -> str:
        return str(self.array.dtype).replace("mlx.core.", "")

    def metadata(self) -> dict[str, Any]:
        """The wire metadata of ARCHITECTURE.md, without the data."""
        meta: dict[str, Any] = {
            "hook_id": self.hook_id,
            "layer_name": self.layer_name,
            "layer": self.layer,
            "component": self.component,
            "step": self.step,
            "positions": list(self.positions),
            "key_positions": self.key_positions,
            "is_input": self.is_input,
            "shape": self.shape,
            "dtype": self.dtype,
        }
        if self.edit is not None:
            meta["edit"] = self.edit
        return meta


# hook id -> the captures of one step, in pass order (the prompt may span several chunks).
StepActivations = dict[str, list[Capture]]
