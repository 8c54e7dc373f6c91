"""Tensor parallelism in one process: a group of one changes nothing, and what cannot split is refused.

The 2-rank equalities are tests/test_distributed_tensor.py; these need no second process.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_engine
from mlx_engine.distributed import (
    ShardedHookPoint,
    ShardingError,
    SiteShard,
    check_parallel,
    check_shardable,
    owner,
    shard,
    split_layers,
)
from mlx_engine.hooks.point import HookPoint
from mlx_engine.tools.convert import quantize_checkpoint


def test_owner_maps_a_global_index_to_its_rank_and_local_index() -> None:
    assert owner(7, 16, 2) == (0, 7)
    assert owner(8, 16, 2) == (1, 0)
    assert owner(15, 16, 4) == (3, 3)
    assert [owner(i, 4, 2) for i in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="evenly"):
        owner(0, 6, 4)
    with pytest.raises(ValueError, match="out of range"):
        owner(16, 16, 2)


def test_a_group_of_one_changes_nothing(llama_checkpoint: Path) -> None:
    group = mx.distributed.init()
    assert group.size() == 1, "this test runs outside a distributed job"
    kit = mlx_engine.load_model(llama_checkpoint)
    before = {k: np.array(v) for k, v in tree_flatten(kit.model.parameters())}
    classes = [type(m) for _, m in kit.model.named_modules()]
    points = kit.model.hook_points()
    plan = shard(kit.model, group)
    assert not plan.sharded and (plan.rank, plan.size) == (0, 1)
    after = {k: np.array(v) for k, v in tree_flatten(kit.model.parameters())}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert [type(m) for _, m in kit.model.named_modules()] == classes
    new_points = kit.model.hook_points()
    assert all(new_points[k] is points[k] and type(points[k]) is HookPoint for k in points)


def test_parallel_tensor_in_one_process_is_the_ordinary_load(llama_checkpoint: Path) -> None:
    plain = mlx_engine.load_model(llama_checkpoint)
    parallel = mlx_engine.load_model(llama_checkpoint, parallel="tensor")
    tokens = mlx_engine.tokenize(plain, "def f(x):\n    return x")
    hooks = ["layers.1.z", "layers.1.mlp_post", "layers.2.attention_pattern"]
    a = mlx_engine.run_with_cache(plain, tokens, hooks)
    b = mlx_engine.run_with_cache(parallel, tokens, hooks)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    for hook in hooks:
        np.testing.assert_array_equal(np.asarray(a[hook]), np.asarray(b[hook]))


def test_unsupported_modes_and_architectures_are_refused(llama_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardingError, match="parallel must be one of 'tensor', 'pipeline', got 'data'"):
        mlx_engine.load_model(llama_checkpoint, parallel="data")
    with pytest.raises(ShardingError, match="not available for model_type 'bert'.*gemma2, gemma3, gemma3_text, gpt2, gpt_oss, llama, mistral, olmo2"):
        check_parallel("bert", "tensor")


def test_counts_that_do_not_split_are_named_before_anything_changes(llama_kit, tmp_path: Path) -> None:
    check_shardable(llama_kit.model, 2, "llama")  # 4 heads, 2 kv heads, 128 units: fine
    with pytest.raises(ShardingError, match=r"over 3 ranks: layer 0: attention heads \(4\) is not divisible by 3 ranks"):
        check_shardable(llama_kit.model, 3, "llama")
    with pytest.raises(ShardingError, match=r"key/value heads \(2\) is not divisible by 4 ranks"):
        check_shardable(llama_kit.model, 4, "llama")
    # 4-bit with 64-wide groups: o_proj's 64 inputs are 32 per rank, half a group.
    q64 = quantize_checkpoint(llama_kit.path, tmp_path / "q64", bits=4, group_size=64)
    quantized = mlx_engine.load_model(q64)
    with pytest.raises(ShardingError, match="not a multiple of the quantization group size 64"):
        check_shardable(quantized.model, 2, "llama")
    check_shardable(quantized.model, 1, "llama")


def test_an_unarmed_sharded_site_hands_its_input_back() -> None:
    point = ShardedHookPoint("layers.0.z", SiteShard(mx.distributed.init(), "heads"))
    x = mx.ones((1, 2, 3, 4))
    assert point(x) is x and not point.armed
    assert isinstance(point, HookPoint) and point.shard.kind == "heads" and point.shard.axis == 1
    units = SiteShard(mx.distributed.init(), "units")
    assert units.axis == -1
    np.testing.assert_array_equal(np.asarray(units.gather(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(units.local(x)), np.asarray(x))
    with pytest.raises(ValueError, match="kind"):
        SiteShard(mx.distributed.init(), "rows")


def test_pipeline_ranges_are_contiguous_and_cover_every_block() -> None:
    assert split_layers(5, 2) == ((0, 3), (3, 5))
    assert split_layers(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    with pytest.raises(ShardingError, match="at least 3 blocks; this model has 2"):
        split_layers(2, 3)


def test_parallel_pipeline_in_one_process_is_the_ordinary_load(llama_checkpoint: Path) -> None:
    plain = mlx_engine.load_model(llama_checkpoint)
    parallel = mlx_engine.load_model(llama_checkpoint, parallel="pipeline")
    assert all(type(p) is HookPoint for p in parallel.hook_points.values())
    tokens = mlx_engine.tokenize(plain, "def f(x):\n    return x")
    hooks = ["layers.1.residual", "layers.2.attention_pattern"]
    a = mlx_engine.run_with_cache(plain, tokens, hooks)
    b = mlx_engine.run_with_cache(parallel, tokens, hooks)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    for hook in hooks:
        np.testing.assert_array_equal(np.asarray(a[hook]), np.asarray(b[hook]))
