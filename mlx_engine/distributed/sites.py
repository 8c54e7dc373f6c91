"""Capture sites of a tensor-parallel model: each rank holds a slice of some hook tensors.

After `shard`, rank r computes heads [r*H/N, (r+1)*H/N) of every attention layer and hidden
units [r*d/N, (r+1)*d/N) of every MLP (and of every expert): the slices are contiguous
blocks in rank order, because mlx-lm's all-to-sharded split cuts a projection's output rows
into N equal blocks. A `ShardedHookPoint` is a HookPoint that knows this (`shard`), so the
hook session can gather a capture into the tensor the unsharded model would have shown and
bind an edit to the slice this rank owns. Unarmed, it is the plain HookPoint's one branch:
sharding adds no communication to a run without hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..hooks.point import HookPoint
from .edits import localize

if TYPE_CHECKING:
    from ..interventions.ops import BoundIntervention

# Block sites whose tensors are split on the head axis ([B, H, T, ...]: axis 1).
HEAD_SITES: tuple[str, ...] = ("query", "key", "value", "attention_scores", "attention_pattern", "z")
# Block sites whose tensors are split on the hidden-unit axis (the last: [B, T, d] or [B, T, k, d]).
UNIT_SITES: tuple[str, ...] = ("mlp_pre", "mlp_post", "expert_pre", "expert_post")


def local_block(x: mx.array, axis: int, size: int, rank: int) -> mx.array:
    """Rank `rank`'s contiguous block of `x` along `axis` (of `size` equal blocks)."""
    return mx.split(x, size, axis=axis)[rank]


def owner(index: int, total: int, size: int) -> tuple[int, int]:
    """(rank, local index) of global head or unit `index` of `total` split over `size` ranks.

    Head 7 of 16 over 2 ranks lives on rank 0 as its local head 7; head 8 on rank 1 as head 0.
    """
    if total % size:
        raise ValueError(f"{total} cannot be split evenly over {size} ranks.")
    per_rank = total // size
    if not 0 <= index < total:
        raise ValueError(f"index {index} is out of range 0..{total - 1}.")
    return index // per_rank, index % per_rank


class SiteShard:
    """How one site's tensor is split: over `group`, on `axis` of the hook tensor (batch kept).

    `kind` is "heads" (axis 1) or "units" (the last axis).
    """

    __slots__ = ("group", "kind", "axis")

    def __init__(self, group: Any, kind: str) -> None:
        if kind not in ("heads", "units"):
            raise ValueError(f"kind must be 'heads' or 'units', got {kind!r}.")
        self.group = group
        self.kind = kind
        self.axis = 1 if kind == "heads" else -1

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def rank(self) -> int:
        return self.group.rank()

    def gather(self, x: mx.array) -> mx.array:
        """The whole tensor from every rank's slice, in the unsharded model's order, on every rank.

        all_gather stacks the ranks' tensors on axis 0 (the batch): split that back into the
        N slices and join them on the sharded axis.
        """
        stacked = mx.distributed.all_gather(x, group=self.group)
        return mx.concatenate(mx.split(stacked, self.size, axis=0), axis=self.axis)

    def local(self, x: mx.array, axis: int | None = None) -> mx.array:
        """This rank's slice of a whole tensor (along the site's axis unless `axis` is given)."""
        return local_block(x, self.axis if axis is None else axis, self.size, self.rank)

    def localize(self, edit: "BoundIntervention") -> "BoundIntervention":
        """The intervention as this rank applies it to its slice (see edits.py)."""
        return localize(edit, self)

    def __repr__(self) -> str:
        return f"SiteShard({self.kind}, rank {self.rank} of {self.size})"


class ShardedHookPoint(HookPoint):
    """A HookPoint whose tensor is this rank's slice of the site (`shard` says which)."""

    __slots__ = ("shard",)

    def __init__(self, name: str, shard: SiteShard) -> None:
        super().__init__(name)
        self.shard = shard

    def __repr__(self) -> str:
        return f"ShardedHookPoint({self.name!r}, {self.shard!r}, armed={self.armed})"


def shard_block_hooks(hooks: Any, group: Any) -> None:
    """Give a block's head and unit sites their sharded HookPoints (same names, nothing armed).

    A block's sites are attributes of its BlockHooks, read by the model code at each call,
    so a replaced point is the one the forward pass calls and the one `hook_points()` lists.
    """
    for kind, names in (("heads", HEAD_SITES), ("units", UNIT_SITES)):
        for name in names:
            point = getattr(hooks, name, None)
            if point is None:
                continue
            if point.fn is not None:
                raise RuntimeError(f"{point.name} is armed; shard a model before any hook session runs on it.")
            setattr(hooks, name, ShardedHookPoint(point.name, SiteShard(group, kind)))
