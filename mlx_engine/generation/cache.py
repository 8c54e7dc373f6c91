"""What `run_with_cache` returns: a mapping that behaves like TransformerLens's ActivationCache.

Index it by the name the caller used (`cache["blocks.1.hook_resid_post"]`) or by the
canonical hook id (`cache["layers.1.residual"]`); a missing key says what was captured.
`stack("residual")` gives [layers, T, d_model]; the Capture records (positions, key
positions, extras) stay at `cache.activations`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from ..hooks.capture import Capture, mlx_to_numpy


class ActivationCache(Mapping):
    """One forward pass over a prompt: its logits and each hook's capture.

    `logits` is [T, vocab], or [1, vocab] when run_with_cache was asked for the last position's alone.
    """

    def __init__(self, tokens: list[int], logits: mx.array, activations: dict[str, Capture], aliases: dict[str, str]) -> None:
        self.tokens = tokens
        self.logits = logits
        self.activations = activations  # hook id -> Capture
        self._aliases = {name: hook_id for name, hook_id in aliases.items() if name not in activations}

    def _hook_id(self, key: str) -> str:
        if key in self.activations:
            return key
        if key in self._aliases:
            return self._aliases[key]
        named = ", ".join(self.activations) or "nothing"
        also = f" (also named {', '.join(self._aliases)})" if self._aliases else ""
        raise KeyError(f"{key!r} was not captured; this cache holds {named}{also}.")

    def __getitem__(self, key: str) -> mx.array:
        return self.activations[self._hook_id(key)].array

    def capture(self, key: str) -> Capture:
        """The whole Capture record (positions, key positions, extras) under a name or hook id."""
        return self.activations[self._hook_id(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def __contains__(self, key: Any) -> bool:
        return key in self.activations or key in self._aliases

    def stack(self, component: str = "residual") -> mx.array:
        """The captures of `component` at every captured layer, in layer order: [layers, ...]."""
        picked = sorted(
            (c for c in self.activations.values() if c.component == component and c.layer is not None and not c.is_input),
            key=lambda c: c.layer,
        )
        if not picked:
            held = sorted({c.component for c in self.activations.values()})
            raise KeyError(f"no {component!r} capture of any layer in this cache; it holds {', '.join(held) or 'nothing'}.")
        return mx.stack([c.array for c in picked])

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Every capture as numpy by hook id (bfloat16 widened to float32), plus `logits`."""
        out = {}
        for hook_id, c in self.activations.items():
            raw, dtype = mlx_to_numpy(c.array)
            out[hook_id] = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else raw
        out["logits"] = np.array(self.logits.astype(mx.float32))
        return out

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.tokens)} tokens, hooks={list(self.activations)})"
