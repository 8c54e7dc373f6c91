"""Interventions at tensor-parallel sites, applied by the rank that owns the slice.

An intervention is resolved against the whole model (16 heads, d_mlp units), so its operand
and its head/feature mask are whole too. On a sharded site each rank holds one contiguous
block of heads or units: the rank keeps the same block of the operand and of the mask, and
applies the edit to its slice with no communication. A head ablation on head 7 of 16 thus
acts on the rank holding head 7; the other rank finds its part of the mask empty and leaves
its slice alone. Only `topk` over hidden units needs the whole row (the k largest of all
d_mlp units), so it gathers, edits, and keeps the rank's slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from ..interventions.ops import BoundIntervention

if TYPE_CHECKING:
    from .sites import SiteShard


def _rebind(edit: BoundIntervention) -> tuple:
    """The constructor arguments that rebuild `edit` (its operand and source as bound)."""
    return edit.resolved, edit.prompt_len, edit._operand, edit._source_start


class LocalIntervention(BoundIntervention):
    """A bound intervention restricted to this rank's block of heads or units."""

    def __init__(self, edit: BoundIntervention, shard: SiteShard) -> None:
        super().__init__(*_rebind(edit))
        self.shard = shard
        self._local: Optional[dict[str, Optional[mx.array]]] = None
        self._idle: Optional[bool] = None

    def _slice(self, name: str, array: mx.array) -> mx.array:
        if self.shard.kind == "units":
            return self.shard.local(array, axis=-1)
        # Head sites: one-position operands and masks are [1, H, 1, D]; patch rows are [H, T, D].
        return self.shard.local(array, axis=0 if name == "operand" and self.op == "patch" else 1)

    def _bind(self) -> dict[str, Optional[mx.array]]:
        if self._local is None:
            whole = super()._bind()
            self._local = {name: None if a is None else self._slice(name, a) for name, a in whole.items()}
        return self._local

    def apply(self, x: mx.array, start: int, end: int) -> mx.array:
        """The edit of this rank's slice; the slice itself when none of its heads or units is chosen."""
        if self._idle is None:
            features = self._bind()["features"]
            self._idle = features is not None and not bool(features.any().item())
        if self._idle:
            return x
        return super().apply(x, start, end)


class GatheredIntervention(BoundIntervention):
    """An edit that needs the whole row of units (`topk`): gather, edit, keep this rank's slice."""

    def __init__(self, edit: BoundIntervention, shard: SiteShard) -> None:
        super().__init__(*_rebind(edit))
        self.shard = shard

    def apply(self, x: mx.array, start: int, end: int) -> mx.array:
        rows = self._rows(start, end)
        if rows is not None and not rows.any():
            return x
        return self.shard.local(super().apply(self.shard.gather(x), start, end))


def localize(edit: BoundIntervention, shard: SiteShard) -> BoundIntervention:
    """`edit` as rank `shard.rank` applies it to its slice of the site."""
    if isinstance(edit, (LocalIntervention, GatheredIntervention)):
        return edit
    if edit.op == "topk" and shard.kind == "units":
        return GatheredIntervention(edit, shard)
    # topk at a head site ranks each head's head_dim features, which every rank holds whole.
    return LocalIntervention(edit, shard)
