"""Pipeline parallelism: each rank holds a contiguous range of blocks, with every hook intact.

`pipeline(model, group)` replaces the blocks a rank does not hold with `AbsentBlock`s before
the lazily loaded weights are evaluated, so a rank materializes only its own blocks (the
embedding, final norm and LM head stay on every rank: every rank samples the same token,
as in mlx-lm's pipeline). Rank 0 holds the first blocks. The hidden state crosses each
boundary with `mx.distributed.send` / `recv_like`, and after the last block the last rank's
output is broadcast with an `all_gather`, kept in the graph as mlx-lm's PipelineMixin does.

Hooks: every site of every block is a `PipelineHookPoint` on every rank, so all ranks list
and arm the same sites. The rank holding a block runs its sites as usual (captures and
edits: an intervention is applied by the owning rank). When one of its sites is armed and
the owner is not rank 0, it also sends the site's input tensor and array context to rank 0,
where the AbsentBlock replays that site through rank 0's own hook session: rank 0 records
the same captures (and computes the same edit, whose result it discards). Replays run in
the order the owner's block calls its sites, one message per armed site; they are
evaluated at once (a header with the shape and dtype, then the arrays), so a run with hooks
armed at remote blocks is synchronous, while a run with nothing armed adds no messages.
The boundary and broadcast ride on the blocks' `residual` sites (the block's output), so the
model files are unchanged. The tests run two ranks. With more, captures still go straight
from the owner to rank 0, which is not every rank's ring neighbour: that path is untested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..hooks.point import HookPoint
from .tensor import ShardingError

DTYPES = (mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint32, mx.int64, mx.uint8, mx.bool_)
CONTEXT_KEYS = ("key_positions", "experts", "weights")
MAX_DIMS = 5
_ENTRY = 3 + MAX_DIMS  # name code, dtype code, ndim, dims
HEADER = 2 + _ENTRY * (1 + len(CONTEXT_KEYS))  # slot, count, then the tensor and its context


@dataclass(frozen=True)
class PipelinePlan:
    """What `pipeline` did: the group, this rank, and each rank's [start, end) of blocks."""

    group: Any
    rank: int
    size: int
    model_type: str
    ranges: tuple[tuple[int, int], ...]

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def owner(self, layer: int) -> int:
        return next(r for r, (s, e) in enumerate(self.ranges) if s <= layer < e)


def split_layers(num_layers: int, size: int) -> tuple[tuple[int, int], ...]:
    """Contiguous, nearly equal ranges of blocks, rank 0 first (the low ranks get the extra blocks)."""
    if num_layers < size:
        raise ShardingError(f"a pipeline over {size} ranks needs at least {size} blocks; this model has {num_layers}.")
    base, extra = divmod(num_layers, size)
    ranges, start = [], 0
    for r in range(size):
        end = start + base + (1 if r < extra else 0)
        ranges.append((start, end))
        start = end
    return tuple(ranges)


def _header(slot: int, arrays: list[tuple[int, mx.array]]) -> mx.array:
    values = [slot, len(arrays)]
    for code, a in arrays:
        if a.ndim > MAX_DIMS:
            raise ValueError(f"a pipeline capture has at most {MAX_DIMS} axes, got shape {a.shape}.")
        values += [code, DTYPES.index(a.dtype), a.ndim, *a.shape, *([0] * (MAX_DIMS - a.ndim))]
    return mx.array(values + [0] * (HEADER - len(values)), dtype=mx.int32)


def send_site(x: mx.array, context: dict[str, Any], slot: int, group: Any) -> None:
    """Send site `slot`'s tensor and array context to rank 0, each message evaluated in order."""
    arrays = [(-1, x)]
    for key, value in context.items():
        if not isinstance(value, mx.array) or key not in CONTEXT_KEYS:
            raise ShardingError(f"a pipeline-parallel site cannot forward its context {key!r} to rank 0.")
        arrays.append((CONTEXT_KEYS.index(key), value))
    mx.eval(mx.distributed.send(_header(slot, arrays), 0, group=group))
    for _, a in arrays:
        mx.eval(mx.distributed.send(a, 0, group=group))


def recv_site(src: int, group: Any) -> tuple[int, mx.array, dict[str, mx.array]]:
    """(slot, tensor, context) of the next site rank `src` sends."""
    header = mx.distributed.recv((HEADER,), mx.int32, src, group=group)
    values = header.tolist()
    slot, count = values[0], values[1]
    x, context = None, {}
    for i in range(count):
        code, dtype, ndim, *dims = values[2 + i * _ENTRY : 2 + (i + 1) * _ENTRY]
        a = mx.distributed.recv(tuple(dims[:ndim]), DTYPES[dtype], src, group=group)
        mx.eval(a)
        if code < 0:
            x = a
        else:
            context[CONTEXT_KEYS[code]] = a
    assert x is not None
    return slot, x, context


class PipelineHookPoint(HookPoint):
    """A block's site under a pipeline: `owner` holds the block; `handoff` acts on the block output."""

    __slots__ = ("owner", "group", "slot", "handoff")

    def __init__(self, name: str, owner: int, group: Any, slot: int) -> None:
        super().__init__(name)
        self.owner = owner
        self.group = group
        self.slot = slot
        self.handoff: Optional[Callable[[mx.array], mx.array]] = None

    def __call__(self, x: mx.array, **context: Any) -> mx.array:
        fn = self.fn
        if fn is not None:
            if self.owner != 0:
                send_site(x, context, self.slot, self.group)
            x = fn(self, x, context)
        return x if self.handoff is None else self.handoff(x)

    def replay(self, x: mx.array, context: dict[str, Any]) -> None:
        """Rank 0: run this site's hook session on the owner's tensor (captures; edits discarded)."""
        if self.fn is not None:
            self.fn(self, x, context)

    def __repr__(self) -> str:
        return f"PipelineHookPoint({self.name!r}, owner {self.owner}, armed={self.armed})"


def broadcast_last(x: mx.array, group: Any) -> mx.array:
    """The last rank's `x` on every rank (all_gather stacks the ranks on axis 0)."""
    n, b = group.size(), x.shape[0]
    return mx.distributed.all_gather(x, group=group)[(n - 1) * b : n * b]


class AbsentBlock(nn.Module):
    """A block held by another rank: keeps its sites, its cache's length, and the pipeline's messages.

    Its cache grows by a one-feature key per position, so masks and key positions built from
    it match the owner's; rank 0 replays the owner's armed sites; the block before this rank's
    first receives the hidden state; the model's last block takes the broadcast.
    """

    def __init__(self, block: Any, layer: int, plan: PipelinePlan) -> None:
        super().__init__()
        self.hooks = block.hooks
        # The block's plain descriptions (`layer_type`, qwen3_moe's `sparse`, ...) stay readable:
        # the model reads them to build masks and listings.
        for key, value in vars(block).items():
            if isinstance(value, (bool, int, float, str)) and not key.startswith("_"):
                setattr(self, key, value)
        self._layer = layer
        self._plan = plan
        # Not a list attribute: a Module's lists are its children, and these are not modules.
        object.__setattr__(self, "_sites", list(block.hooks.points().values()))

    def __call__(self, h: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        plan, i = self._plan, self._layer
        if cache is not None:
            B, T = h.shape[0], h.shape[1]
            cache.update_and_fetch(mx.zeros((B, 1, T, 1), h.dtype), mx.zeros((B, 1, T, 1), h.dtype))
        owner = plan.owner(i)
        if plan.rank == 0 and owner != 0:
            for _ in range(sum(p.fn is not None for p in self._sites)):
                slot, x, context = recv_site(owner, plan.group)
                self._sites[slot].replay(x, context)
        start, _ = plan.ranges[plan.rank]
        if plan.rank > 0 and i == start - 1:
            h = mx.distributed.recv_like(h, plan.rank - 1, group=plan.group)
        if i == plan.ranges[-1][1] - 1:  # the model's last block, held by the last rank
            h = broadcast_last(h, plan.group)
        return h


def _remote_armed(points: list[PipelineHookPoint]) -> bool:
    return any(p.fn is not None for p in points)


def _boundary(plan: PipelinePlan, remote: list[PipelineHookPoint]) -> Callable[[mx.array], mx.array]:
    """What this rank's last block does with its output: send it on, or broadcast it (last rank)."""
    group, rank = plan.group, plan.rank
    if rank == plan.size - 1:
        return lambda y: broadcast_last(y, group)

    def send_on(y: mx.array) -> mx.array:
        y = mx.distributed.send(y, rank + 1, group=group)
        if rank == 0 and _remote_armed(remote):
            mx.eval(y)  # rank 0 is about to wait for the next ranks' sites: they need this first
        return y

    return send_on


def check_pipelineable(model: Any) -> None:
    for i, block in enumerate(model.layers):
        if not hasattr(block, "hooks") or not hasattr(block.hooks, "points"):
            raise ShardingError(f"pipeline parallelism needs a native architecture; block {i} has no block hooks.")


def pipeline(model: Any, group: Optional[Any] = None, model_type: Optional[str] = None) -> PipelinePlan:
    """Split `model`'s blocks over `group` in place (before its weights are evaluated); returns the plan.

    With a group of one nothing is touched. Call it before any hook session is armed, and
    rebuild `hook_points()` afterwards (every block site is a new PipelineHookPoint).
    """
    group = group if group is not None else mx.distributed.init()
    model_type = model_type or getattr(model, "model_type", "")
    check_pipelineable(model)
    layers = model.layers
    ranges = split_layers(len(layers), group.size()) if group.size() > 1 else ((0, len(layers)),)
    plan = PipelinePlan(group=group, rank=group.rank(), size=group.size(), model_type=model_type, ranges=ranges)
    if plan.size == 1:
        return plan
    remote: list[PipelineHookPoint] = []
    for i, block in enumerate(layers):
        owner = plan.owner(i)
        hooks = block.hooks
        for slot, (attr, point) in enumerate(_site_attrs(hooks)):
            new = PipelineHookPoint(point.name, owner, group, slot)
            setattr(hooks, attr, new)
            if owner != plan.rank:
                remote.append(new)
    start, end = ranges[plan.rank]
    for i, block in enumerate(layers):
        if not start <= i < end:
            layers[i] = AbsentBlock(block, i, plan)
    layers[end - 1].hooks.residual.handoff = _boundary(plan, remote)
    return plan


def _site_attrs(hooks: Any) -> list[tuple[str, HookPoint]]:
    """(attribute, point) of a BlockHooks' sites in `points()` order: slot i is the same site on every rank."""
    by_id = {id(v): k for k, v in vars(hooks).items() if isinstance(v, HookPoint)}
    return [(by_id[id(p)], p) for p in hooks.points().values()]
