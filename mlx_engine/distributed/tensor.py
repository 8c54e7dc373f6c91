"""Tensor parallelism for the native architectures, applied from outside their model files.

`shard(model, group)` does what mlx-lm's `Model.shard` does for the same architecture:
q/k/v and the MLP's gate/up become all-to-sharded (each rank computes a contiguous block
of heads and hidden units), o and down become sharded-to-all (partial products summed over
the ranks), experts are split on their hidden units, and the per-rank attention modules'
`n_heads`/`n_kv_heads` (and gpt-oss's sinks) shrink to the rank's block. Embeddings, norms,
routers and the LM head stay whole on every rank, so everything after each sublayer (the
residual stream, the logits, the sampled token) is the same on every rank.

Which modules to split is the per-architecture table `ADAPTERS`: the model files keep
stable attribute names (`self_attn.q_proj`, `mlp.gate_proj`, a SwitchGLU at `mlp.experts`
or `mlp.switch_mlp`), so one routine serves every entry. The head and unit hook sites become
ShardedHookPoints (sites.py), which the hook session gathers or localizes only when armed.
With a group of size 1 nothing is touched: the model is exactly the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from .layers import shard_switch_glu
from .sites import local_block, shard_block_hooks


class ShardingError(ValueError):
    """A model that cannot be split over the group as asked; the message says why."""


@dataclass(frozen=True)
class BlockLayout:
    """Where a block keeps what is split. `experts`: the attribute of `block.mlp` holding a
    SwitchGLU (None: a dense gated MLP); `sinks`: attention has per-head sink logits."""

    experts: Optional[str] = None
    sinks: bool = False


ADAPTERS: dict[str, BlockLayout] = {
    "llama": BlockLayout(),
    "mistral": BlockLayout(),
    "qwen2": BlockLayout(),
    "qwen3": BlockLayout(),
    # Dense blocks of qwen3_moe (mlp_only_layers) have no `switch_mlp` and are split as dense.
    "qwen3_moe": BlockLayout(experts="switch_mlp"),
    "gpt_oss": BlockLayout(experts="experts", sinks=True),
}


@dataclass(frozen=True)
class ShardPlan:
    """What `shard` did: the group, this rank, and the model type it split."""

    group: Any
    rank: int
    size: int
    model_type: str

    @property
    def sharded(self) -> bool:
        return self.size > 1


def adapter_for(model_type: str) -> BlockLayout:
    layout = ADAPTERS.get(model_type)
    if layout is None:
        raise ShardingError(
            f"tensor parallelism is not available for model_type {model_type!r}; "
            f"it covers {', '.join(sorted(ADAPTERS))}."
        )
    return layout


def _experts(block: Any, layout: BlockLayout) -> Optional[SwitchGLU]:
    found = getattr(block.mlp, layout.experts, None) if layout.experts else None
    return found if isinstance(found, SwitchGLU) else None


def _in_units(layer: Any) -> tuple[int, Optional[int]]:
    """(input units, quantization group size or None) of a Linear, QuantizedLinear or SwitchLinear."""
    if isinstance(layer, (nn.QuantizedLinear, QuantizedSwitchLinear)):
        return layer.scales.shape[-1] * layer.group_size, layer.group_size
    return layer.weight.shape[-1], None


def _splits(what: str, total: int, size: int, group_size: Optional[int] = None) -> list[str]:
    if total % size:
        return [f"{what} ({total}) is not divisible by {size} ranks"]
    if group_size is not None and (total // size) % group_size:
        return [f"{what}: {total // size} input units per rank is not a multiple of the quantization group size {group_size}"]
    return []


def check_shardable(model: Any, size: int, model_type: str) -> None:
    """Raise ShardingError naming every count that does not split over `size` ranks (before any change)."""
    layout = adapter_for(model_type)
    problems: list[str] = []
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        problems += _splits(f"layer {i}: attention heads", attn.n_heads, size)
        problems += _splits(f"layer {i}: key/value heads", attn.n_kv_heads, size)
        o_units, o_group = _in_units(attn.o_proj)
        problems += _splits(f"layer {i}: o_proj input units", o_units, size, o_group)
        experts = _experts(block, layout)
        down = experts.down_proj if experts is not None else block.mlp.down_proj
        kind = "expert hidden units" if experts is not None else "MLP hidden units"
        units, group_size = _in_units(down)
        problems += _splits(f"layer {i}: {kind}", units, size, group_size)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ShardingError(f"cannot split this {model_type} model over {size} ranks: {shown}.")


def _shard_attention(attn: Any, layout: BlockLayout, group: Any) -> None:
    n, r = group.size(), group.rank()
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
    attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    if layout.sinks:
        attn.sinks = mx.contiguous(local_block(attn.sinks, 0, n, r))
    attn.n_heads //= n
    attn.n_kv_heads //= n


def _shard_dense_mlp(mlp: Any, group: Any) -> None:
    mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
    mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
    mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def shard(model: Any, group: Optional[Any] = None, model_type: Optional[str] = None) -> ShardPlan:
    """Split `model` (a native Model) over `group` in place; returns what was done.

    `group` defaults to `mx.distributed.init()` (the job's global group). The architecture
    is checked even for a group of one, so an unsupported model fails on a laptop before it
    fails on a cluster; the model itself is only changed when the group has several ranks.
    Call it before any hook session is armed, and rebuild `hook_points()` afterwards (the
    head and unit sites are new ShardedHookPoint objects).
    """
    group = group if group is not None else mx.distributed.init()
    model_type = model_type or getattr(model, "model_type", "")
    layout = adapter_for(model_type)
    plan = ShardPlan(group=group, rank=group.rank(), size=group.size(), model_type=model_type)
    if plan.size == 1:
        return plan
    check_shardable(model, plan.size, model_type)
    for block in model.layers:
        _shard_attention(block.self_attn, layout, group)
        experts = _experts(block, layout)
        if experts is not None:
            shard_switch_glu(experts, group)
        else:
            _shard_dense_mlp(block.mlp, group)
        shard_block_hooks(block.hooks, group)
    return plan
