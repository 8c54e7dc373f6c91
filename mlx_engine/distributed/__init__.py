"""Distributed inference over `mx.distributed`: tensor and pipeline parallelism with every hook intact.

`load_model(path, parallel="tensor")` (mlx_engine.loading) calls `parallelize` inside a
distributed job (`mlx.launch`, or MLX_RANK and MLX_HOSTFILE set for each process): every rank
reads the checkpoint lazily, `shard` splits it as mlx-lm does, and only then are the weights
evaluated, so a rank keeps its own slice resident (it still reads the whole files). Every rank
runs the same generation; the logits and tokens agree on every rank, and captures of sharded
sites are gathered into the unsharded tensor on every rank (rank 0 is what callers read).

    tensor.py   the per-architecture table and `shard` (attention heads, MLP units, experts)
    layers.py   expert layers summed across ranks (SwitchLinear, quantized too)
    sites.py    ShardedHookPoint: how a head or unit site is split, gathered and sliced
    edits.py    interventions at sharded sites, applied by the rank that owns the slice
    pipeline.py `parallel="pipeline"`: contiguous ranges of blocks per rank, sites replayed on rank 0
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import mlx.core as mx

from .pipeline import PipelineHookPoint, PipelinePlan, pipeline, split_layers
from .sites import HEAD_SITES, UNIT_SITES, ShardedHookPoint, SiteShard, owner
from .tensor import (
    ADAPTERS,
    ShardingError,
    ShardPlan,
    adapter_for,
    check_shardable,
    shard,
)

PARALLEL_MODES = ("tensor", "pipeline")

__all__ = [
    "ADAPTERS",
    "HEAD_SITES",
    "PARALLEL_MODES",
    "PipelineHookPoint",
    "PipelinePlan",
    "UNIT_SITES",
    "adapter_for",
    "ShardPlan",
    "ShardedHookPoint",
    "ShardingError",
    "SiteShard",
    "check_parallel",
    "check_shardable",
    "owner",
    "parallelize",
    "pipeline",
    "shard",
    "split_layers",
]


def check_parallel(model_type: str, parallel: str) -> None:
    """Refuse an unknown mode or an architecture without an adapter, before any weight is read.

    Pipeline parallelism needs no per-architecture table: any native model splits by blocks.
    """
    if parallel not in PARALLEL_MODES:
        raise ShardingError(f"parallel must be one of {', '.join(map(repr, PARALLEL_MODES))}, got {parallel!r}.")
    if parallel == "tensor":
        adapter_for(model_type)


def parallelize(model: Any, config: Mapping[str, Any], parallel: str, group: Optional[Any] = None) -> Union[ShardPlan, PipelinePlan]:
    """Split a freshly loaded (possibly lazy) model as `parallel` asks, then evaluate its weights.

    Evaluating after the split keeps only this rank's slices (tensor) or blocks (pipeline)
    of a lazily loaded checkpoint.
    """
    check_parallel(config["model_type"], parallel)
    split = pipeline if parallel == "pipeline" else shard
    plan = split(model, group, model_type=config.get("model_type"))
    mx.eval(model.parameters())
    return plan
