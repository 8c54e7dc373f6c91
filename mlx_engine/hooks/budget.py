"""How many bytes a capture request would hold, estimated before anything runs.

A server refuses a request over its budget before generating, so the estimate must
cover every pass: the prompt, then one position per generated token but the last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

from .architecture import ArchitectureInfo
from .components import KEYED_COMPONENTS, elements_per_position
from .names import HookRequest, ResolvedHook, resolve_hooks

if TYPE_CHECKING:
    from ..loading import ModelKit

# Scores and patterns are computed and kept in float32 whatever the model's dtype.
KEYED_ITEMSIZE = 4


class CaptureBudgetError(ValueError):
    """A request would capture more bytes than the configured budget allows."""

    def __init__(self, estimate_bytes: int, budget_bytes: int) -> None:
        super().__init__(
            f"This request would capture about {estimate_bytes / 2**20:.1f} MiB of activations "
            f"({estimate_bytes} bytes), over the capture budget of {budget_bytes / 2**20:.1f} MiB "
            f"({budget_bytes} bytes). Ask for fewer hooks, layers or tokens."
        )
        self.estimate_bytes = estimate_bytes
        self.budget_bytes = budget_bytes


def capture_bytes(
    info: ArchitectureInfo, resolved: Sequence[ResolvedHook], prompt_len: int, max_tokens: int, itemsize: int
) -> int:
    """Bytes the resolved hooks capture over a prompt pass and max_tokens - 1 decode passes."""
    rows = prompt_len + max(max_tokens - 1, 0)
    total = 0
    for r in resolved:
        if r.component in KEYED_COMPONENTS:
            window = info.window_of(r.layer)
            keys = prompt_len * prompt_len
            for k in range(1, max_tokens):
                s = prompt_len + k
                keys += min(s, window) if window else s
            total += info.n_heads * keys * KEYED_ITEMSIZE
        else:
            features = len(r.indices) if r.indices is not None else None
            total += rows * elements_per_position(info, r.component, features) * itemsize
    return total


def check_budget(
    info: ArchitectureInfo, resolved: Sequence[ResolvedHook], prompt_len: int, max_tokens: int, itemsize: int, budget: int
) -> None:
    """Raise CaptureBudgetError when the request would capture more than `budget` bytes."""
    estimate = capture_bytes(info, resolved, prompt_len, max_tokens, itemsize)
    if estimate > budget:
        raise CaptureBudgetError(estimate, budget)


def estimate_capture_bytes(kit: "ModelKit", specs: Iterable[HookRequest], prompt_len: int, max_tokens: int) -> int:
    """Bytes a generation with these hooks would capture (prompt pass plus max_tokens - 1 decode passes)."""
    resolved = resolve_hooks(kit.arch_info, kit.native, specs)
    return capture_bytes(kit.arch_info, resolved, prompt_len, max_tokens, kit.activation_itemsize)
