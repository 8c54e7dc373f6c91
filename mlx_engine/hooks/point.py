"""A named identity placed at each capture site inside the model code.

MLX modules have no forward hooks and Python looks `__call__` up on the type, so a
capture site must be an explicit call in the model's own forward. An unarmed
HookPoint is one branch that hands its input back; a hook session arms it by setting
`fn`, which may record the tensor (capture) or return an edited one (intervention).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx

# fn(hook_point, tensor, context) -> tensor. The context carries what only the model
# knows at that moment (for attention: the absolute positions of the key columns).
HookFn = Callable[["HookPoint", mx.array, dict[str, Any]], mx.array]


class HookPoint:
    """Capture site `name` (`embedding`, `layers.3.query`, `final_norm`, ...)."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fn: Optional[HookFn] = None

    @property
    def armed(self) -> bool:
        return self.fn is not None

    def __call__(self, x: mx.array, **context: Any) -> mx.array:
        fn = self.fn
        if fn is None:
            return x
        return fn(self, x, context)

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, armed={self.armed})"
