"""Long prompts: run_with_cache prefills in chunks and joins them exactly; position, feature and
dtype subsets of a capture equal the same slices of a full float32 capture; the budget counts
the explicit attention path's transient memory."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import pytest

import mlx_engine
from test_hooks_equivalence import ARCHS, all_hooks

PROMPT = "def encode(self, obj):\n    return json.dumps(obj, indent=4)\n" * 3


@pytest.fixture(scope="module", params=["llama", "mistral", "gpt2", "gpt_oss"])
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    build, _, _ = ARCHS[request.param]
    path, _ = build(tmp_path_factory.mktemp(request.param))
    return mlx_engine.load_model(path)


def as_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def test_chunked_run_with_cache_equals_one_forward_for_every_component(kit: Any) -> None:
    ids = mlx_engine.tokenize(kit, PROMPT)
    hooks = all_hooks(kit)
    whole = mlx_engine.run_with_cache(kit, ids, hooks, prefill_step_size=len(ids))
    for chunk in (7, 16):
        chunked = mlx_engine.run_with_cache(kit, ids, hooks, prefill_step_size=chunk)
        np.testing.assert_allclose(as_np(chunked.logits), as_np(whole.logits), atol=1e-4, rtol=1e-4)
        assert set(chunked) == set(whole)
        for hook_id in whole:
            a, b = whole.capture(hook_id), chunked.capture(hook_id)
            assert a.shape == b.shape and a.positions == b.positions == (0, len(ids)), hook_id
            assert a.key_positions == b.key_positions, hook_id
            x, y = as_np(a.array), as_np(b.array)
            assert np.array_equal(np.isneginf(x), np.isneginf(y)), hook_id  # the same masked keys
            finite = np.isfinite(x)
            np.testing.assert_allclose(y[finite], x[finite], atol=1e-4, rtol=1e-4, err_msg=f"{hook_id} chunk {chunk}")
            for name, extra in a.extras.items():
                assert np.array_equal(np.sort(np.array(extra), -1), np.sort(np.array(b.extras[name]), -1)) or name == "weights"


def test_position_feature_and_dtype_subsets_are_slices_of_the_full_capture(kit: Any) -> None:
    ids = mlx_engine.tokenize(kit, PROMPT)
    layer = 1
    full = mlx_engine.run_with_cache(kit, ids, [{"layer_name": layer, "component": c} for c in ("residual", "attention_pattern", "z")])
    wanted = [2, 5, len(ids) - 1]
    sub = mlx_engine.run_with_cache(
        kit,
        ids,
        [
            {"layer_name": layer, "component": "residual", "positions": wanted, "indices": [7, 1], "dtype": "bfloat16", "hook_id": "r"},
            {"layer_name": layer, "component": "attention_pattern", "positions": "last", "dtype": "float16", "hook_id": "p"},
            {"layer_name": layer, "component": "z", "positions": wanted, "hook_id": "z"},
        ],
        prefill_step_size=8,
    )
    r = sub.capture("r")
    assert r.row_positions == wanted and r.indices == [7, 1] and r.dtype == "bfloat16"
    expected = as_np(full[f"layers.{layer}.residual"])[wanted][:, [7, 1]]
    np.testing.assert_allclose(as_np(r.array), expected, rtol=2**-7, atol=1e-4)  # bfloat16: 8 bits of mantissa
    p = sub.capture("p")
    # "last" of each 8-token prefill chunk: one row per chunk.
    assert p.row_positions == [min(s + 8, len(ids)) - 1 for s in range(0, len(ids), 8)]
    pattern = as_np(full[f"layers.{layer}.attention_pattern"])[:, p.row_positions][:, :, p.key_positions]
    np.testing.assert_allclose(as_np(p.array), pattern, atol=1e-3)  # float16
    z = sub.capture("z")
    np.testing.assert_allclose(as_np(z.array), as_np(full[f"layers.{layer}.z"])[:, wanted], atol=1e-4, rtol=1e-4)  # chunked vs one forward


def test_pattern_budget_counts_the_transient_attention_memory(kit: Any) -> None:
    ids = mlx_engine.tokenize(kit, PROMPT)
    last = [{"layer_name": 1, "component": "attention_pattern", "positions": "last"}]
    kept = kit.arch_info.n_heads * len(ids) * 4  # one row over (at most) every key, float32
    estimate = mlx_engine.estimate_capture_bytes(kit, last, len(ids), 1)
    assert estimate > kept  # the explicit path's [heads, chunk, keys] arrays are counted too
    with pytest.raises(mlx_engine.CaptureBudgetError):
        mlx_engine.create_generator_with_activations(kit, ids, last, max_tokens=1, capture_budget_bytes=estimate - 1)
    next(mlx_engine.create_generator_with_activations(kit, ids, last, max_tokens=1, capture_budget_bytes=estimate))


def test_last_position_logits_are_the_last_row_of_every_positions_logits(kit: Any) -> None:
    ids = mlx_engine.tokenize(kit, PROMPT)
    hooks = [{"layer_name": 1, "component": "residual"}, {"layer_name": 1, "component": "attention_pattern"}]
    every = mlx_engine.run_with_cache(kit, ids, hooks, prefill_step_size=16)
    last = mlx_engine.run_with_cache(kit, ids, hooks, prefill_step_size=16, logits="last")
    assert every.logits.shape == (len(ids), kit.arch_info.vocab_size)
    assert last.logits.shape == (1, kit.arch_info.vocab_size)
    np.testing.assert_allclose(as_np(last.logits[0]), as_np(every.logits[-1]), atol=1e-5, rtol=1e-5)  # the LM head on one row
    for hook_id in every:
        assert np.array_equal(as_np(last[hook_id]), as_np(every[hook_id])), hook_id  # the forward is the same
    with pytest.raises(ValueError, match='logits must be "all"'):
        mlx_engine.run_with_cache(kit, ids, hooks, logits="first")
