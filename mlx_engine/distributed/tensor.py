"""Tensor parallelism for the native architectures, applied from outside their model files.

`shard(model, group)` does what mlx-lm's `Model.shard` does for the same architecture:
q/k/v and the MLP's gate/up become all-to-sharded (each rank computes a contiguous block
of heads and hidden units), o and down become sharded-to-all (partial products summed over
the ranks), experts are split on their hidden units, and the per-rank attention modules'
`n_heads`/`n_kv_heads` (and gpt-oss's sinks) shrink to the rank's block. Embeddings, norms,
routers and the LM head stay whole on every rank, so everything after each sublayer (the
residual stream, the logits, the sampled token) is the same on every rank.

Which modules to split is the per-architecture table `ADAPTERS`: the attribute names of
each model file (`self_attn.q_proj`, `mlp.gate_proj`, a SwitchGLU at `mlp.experts` or
`mlp.switch_mlp`), so one routine serves every entry. Fused projections split per segment
(GPT-2's c_attn into q|k|v, phi3's qkv_proj and gate_up_proj), so each rank still holds
whole heads and matching gate/up units; OLMo 2's norms over all heads become a
ShardedRMSNorm. The head and unit hook sites become ShardedHookPoints (sites.py), which
the hook session gathers or localizes only when armed.
With a group of size 1 nothing is touched: the model is exactly the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from .layers import ShardedRMSNorm, shard_switch_glu
from .sites import local_block, shard_block_hooks


class ShardingError(ValueError):
    """A model that cannot be split over the group as asked; the message says why."""


# How a fused projection's output axis splits: a count of equal parts (GPT-2's c_attn: 3,
# phi3's gate_up_proj: 2), or "qkv" for queries, keys and values of unequal widths (phi3's
# qkv_proj with grouped-query attention), computed from the attention module's head counts.
Segments = Union[int, str]


@dataclass(frozen=True)
class BlockLayout:
    """Where a block keeps what is split (attribute names of the model files).

    `attn`: the block's attention module; `qkv`: its input projections and how each splits;
    `out`: its output projection; `heads`: its head-count attributes, shrunk to the rank's
    block; `mlp_in`/`mlp_out`: a dense MLP's projections; `experts`: the attribute of
    `block.mlp` holding a SwitchGLU (None: dense); `sinks`: per-head sink logits.
    """

    attn: str = "self_attn"
    qkv: tuple[tuple[str, Segments], ...] = (("q_proj", 1), ("k_proj", 1), ("v_proj", 1))
    out: str = "o_proj"
    heads: tuple[str, ...] = ("n_heads", "n_kv_heads")
    mlp_in: tuple[tuple[str, Segments], ...] = (("gate_proj", 1), ("up_proj", 1))
    mlp_out: str = "down_proj"
    experts: Optional[str] = None
    sinks: bool = False
    norms: tuple[str, ...] = ()


ADAPTERS: dict[str, BlockLayout] = {
    "llama": BlockLayout(),
    "mistral": BlockLayout(),
    "qwen2": BlockLayout(),
    "qwen3": BlockLayout(),
    # Gemma 3's q_norm/k_norm act on each head's head_dim, so they need no communication.
    "gemma2": BlockLayout(),
    "gemma3": BlockLayout(),
    "gemma3_text": BlockLayout(),
    "gpt2": BlockLayout(attn="attn", qkv=(("c_attn", 3),), out="c_proj", heads=("n_head",), mlp_in=(("c_fc", 1),), mlp_out="c_proj"),
    "phi3": BlockLayout(qkv=(("qkv_proj", "qkv"),), mlp_in=(("gate_up_proj", 2),)),
    # Dense blocks of qwen3_moe (mlp_only_layers) have no `switch_mlp` and are split as dense.
    "qwen3_moe": BlockLayout(experts="switch_mlp"),
    "gpt_oss": BlockLayout(experts="experts", sinks=True),
    # OLMo 2 normalizes the projected queries and keys over all heads at once.
    "olmo2": BlockLayout(norms=("q_norm", "k_norm")),
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
        attn = getattr(block, layout.attn)
        for label, name in zip(("attention heads", "key/value heads"), dict.fromkeys(layout.heads)):
            problems += _splits(f"layer {i}: {label}", getattr(attn, name), size)
        o_units, o_group = _in_units(getattr(attn, layout.out))
        problems += _splits(f"layer {i}: {layout.out} input units", o_units, size, o_group)
        experts = _experts(block, layout)
        down = experts.down_proj if experts is not None else getattr(block.mlp, layout.mlp_out)
        kind = "expert hidden units" if experts is not None else "MLP hidden units"
        units, group_size = _in_units(down)
        problems += _splits(f"layer {i}: {kind}", units, size, group_size)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ShardingError(f"cannot split this {model_type} model over {size} ranks: {shown}.")


def _segments(attn: Any, segments: Segments) -> Union[int, list[int]]:
    if segments == "qkv":
        q = attn.n_heads * attn.head_dim
        return [q, q + attn.n_kv_heads * attn.head_dim]
    return int(segments)


def _shard_attention(attn: Any, layout: BlockLayout, group: Any) -> None:
    n, r = group.size(), group.rank()
    for name, segments in layout.qkv:
        layer = getattr(attn, name)
        setattr(attn, name, shard_linear(layer, "all-to-sharded", segments=_segments(attn, segments), group=group))
    setattr(attn, layout.out, shard_linear(getattr(attn, layout.out), "sharded-to-all", group=group))
    if layout.sinks:
        attn.sinks = mx.contiguous(local_block(attn.sinks, 0, n, r))
    for name in layout.norms:
        setattr(attn, name, ShardedRMSNorm(getattr(attn, name), group))
    for name in layout.heads:
        setattr(attn, name, getattr(attn, name) // n)


def _shard_dense_mlp(mlp: Any, layout: BlockLayout, group: Any) -> None:
    for name, segments in layout.mlp_in:
        setattr(mlp, name, shard_linear(getattr(mlp, name), "all-to-sharded", segments=int(segments), group=group))
    setattr(mlp, layout.mlp_out, shard_linear(getattr(mlp, layout.mlp_out), "sharded-to-all", group=group))


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
        _shard_attention(getattr(block, layout.attn), layout, group)
        experts = _experts(block, layout)
        if experts is not None:
            shard_switch_glu(experts, group)
        else:
            _shard_dense_mlp(block.mlp, layout, group)
        shard_block_hooks(block.hooks, group)
    return plan
