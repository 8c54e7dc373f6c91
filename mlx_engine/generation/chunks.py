"""One capture per hook over a whole prompt, from the captures of its prefill chunks.

Rows join along the position axis (axis 1 for head-wise and attention tensors, axis 0
otherwise). Scores and patterns of different chunks attend to different keys (a chunk
sees the keys up to its end, a sliding-window layer only its window), so they are laid
out over the union of the chunks' key positions, with the columns a row did not attend
at -inf (scores) and 0 (patterns): exactly what a single forward over the prompt gives.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import mlx.core as mx

from ..hooks.capture import Capture
from ..hooks.components import HEAD_COMPONENTS, KEYED_COMPONENTS, ComponentType

_ROWS_ON_AXIS_1 = {c.value for c in HEAD_COMPONENTS + KEYED_COMPONENTS}
_KEYED = {c.value for c in KEYED_COMPONENTS}


def _spread_keys(c: Capture, union: list[int]) -> mx.array:
    """A scores/pattern capture [H, T, S] laid out over the union of key positions."""
    fill = -mx.inf if c.component == ComponentType.ATTENTION_SCORES.value else 0.0
    keys = list(c.key_positions or [])
    if keys == union:
        return c.array
    first = union.index(keys[0])
    if keys != union[first : first + len(keys)]:
        raise ValueError(f"{c.hook_id}: chunk key positions are not contiguous in the prompt's keys")
    H, T, _ = c.array.shape
    left = mx.full((H, T, first), fill, dtype=c.array.dtype)
    right = mx.full((H, T, len(union) - first - len(keys)), fill, dtype=c.array.dtype)
    return mx.concatenate([left, c.array, right], axis=-1)


def _join(parts: list[Capture]) -> Capture:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    axis = 1 if first.component in _ROWS_ON_AXIS_1 else 0
    arrays = [p.array for p in parts]
    key_positions: Optional[list[int]] = None
    if first.component in _KEYED:
        key_positions = sorted({k for p in parts for k in (p.key_positions or [])})
        arrays = [_spread_keys(p, key_positions) for p in parts]
    extras = {name: mx.concatenate([p.extras[name] for p in parts], axis=0) for name in first.extras}
    rows = None
    if first.row_positions is not None:
        rows = [r for p in parts for r in (p.row_positions or [])]
    return replace(
        first,
        positions=(first.positions[0], parts[-1].positions[1]),
        array=mx.concatenate(arrays, axis=axis),
        key_positions=key_positions,
        extras=extras,
        row_positions=rows,
    )


def join_chunks(captures: list[Capture], n_tokens: int) -> dict[str, Capture]:
    """The captures of every chunk of one prompt pass, joined per hook id (in chunk order).

    Takes the chunks out of `captures` (the list is left empty) and joins one hook at a
    time, evaluated before the next: the peak holds one hook's tensor twice, not them all.
    """
    by_hook: dict[str, list[Capture]] = {}
    for c in captures:
        by_hook.setdefault(c.hook_id, []).append(c)
    captures.clear()
    joined: dict[str, Capture] = {}
    for hook_id in list(by_hook):
        whole = _join(by_hook.pop(hook_id))
        mx.eval(whole.array, list(whole.extras.values()))
        joined[hook_id] = whole
    return joined
