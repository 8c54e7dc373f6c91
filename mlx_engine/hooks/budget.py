"""How many bytes a capture request would hold, estimated before anything runs.

A server refuses a request over its budget before generating, so the estimate must
cover every pass: the prompt, then one position per generated token but the last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

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


# Arrays of [H, C, S] float32 the explicit attention path holds at once (scores, exponentials, probabilities).
EXPLICIT_ATTENTION_ARRAYS = 3
PREFILL_CHUNK = 512
# A response also holds its captures encoded. JSON writes each value as the shortest decimal
# that round-trips it as a float64: at most 24 characters with its comma ("-1.1754942106924411e-38,").
JSON_BYTES_PER_ELEMENT = 24


def encoded_bytes(elements: int, itemsize: int, encoding: Optional[str]) -> int:
    """Bytes of `elements` values of `itemsize` bytes in a response's activation_format."""
    if encoding == "json":
        return elements * JSON_BYTES_PER_ELEMENT
    if encoding == "base64":
        return 4 * -(-elements * itemsize // 3)
    return 0  # "none", or no response at all (the Python API)


def _kept_rows(r: ResolvedHook, prompt_len: int, max_tokens: int, chunk: int) -> list[int]:
    """The absolute positions whose rows the hook keeps over a whole run."""
    n_positions = prompt_len + max(max_tokens - 1, 0)
    if r.positions is None:
        return list(range(n_positions))
    if r.positions == "last":
        ends = [min(start + chunk, prompt_len) - 1 for start in range(0, prompt_len, chunk)]
        return ends + list(range(prompt_len, n_positions))
    return [p for p in r.positions if p < n_positions]


def capture_bytes(
    info: ArchitectureInfo,
    resolved: Sequence[ResolvedHook],
    prompt_len: int,
    max_tokens: int,
    itemsize: int,
    chunk: int = PREFILL_CHUNK,
    encoding: Optional[str] = None,
) -> int:
    """Bytes the resolved hooks hold over a prompt pass and max_tokens - 1 decode passes.

    Kept bytes, plus the transient memory of the explicit attention path where scores or
    patterns are armed: it materialises [n_heads, chunk, keys] float32 arrays whatever
    subset of rows is kept, and it is the largest single allocation of such a request.
    With `encoding` (a response's activation_format) the encoded copy counts too.
    """
    total = 0
    transient = 0
    for r in resolved:
        rows = _kept_rows(r, prompt_len, max_tokens, chunk)
        size = itemsize if r.dtype is None else {"float32": 4, "float16": 2, "bfloat16": 2}[r.dtype]
        if r.component in KEYED_COMPONENTS:
            window = info.window_of(r.layer)
            # A prompt row sees up to the whole prompt (its chunk's keys); a decode row its position + 1.
            keys = [min(prompt_len if p < prompt_len else p + 1, window or p + prompt_len + 1) for p in rows]
            elements, size = info.n_heads * sum(keys), max(size, KEYED_ITEMSIZE if r.dtype is None else size)
            widest = min(prompt_len, window or prompt_len)
            transient = max(transient, EXPLICIT_ATTENTION_ARRAYS * info.n_heads * min(chunk, prompt_len) * widest * KEYED_ITEMSIZE)
        else:
            features = len(r.indices) if r.indices is not None else None
            elements = len(rows) * elements_per_position(info, r.component, features)
        total += elements * size + encoded_bytes(elements, size, encoding)
    return total + transient


def check_budget(
    info: ArchitectureInfo,
    resolved: Sequence[ResolvedHook],
    prompt_len: int,
    max_tokens: int,
    itemsize: int,
    budget: int,
    encoding: Optional[str] = None,
) -> None:
    """Raise CaptureBudgetError when the request would capture more than `budget` bytes
    (counting the response's encoded copy for `encoding`)."""
    estimate = capture_bytes(info, resolved, prompt_len, max_tokens, itemsize, encoding=encoding)
    if estimate > budget:
        raise CaptureBudgetError(estimate, budget)


def estimate_capture_bytes(kit: "ModelKit", specs: Iterable[HookRequest], prompt_len: int, max_tokens: int) -> int:
    """Bytes a generation with these hooks would capture (prompt pass plus max_tokens - 1 decode passes)."""
    resolved = resolve_hooks(kit.arch_info, kit.native, specs)
    return capture_bytes(kit.arch_info, resolved, prompt_len, max_tokens, kit.activation_itemsize)
