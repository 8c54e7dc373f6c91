"""Attention spread over CPU streams (models/cpu_parallel.py) equals the one-stream kernel,
and a long prompt's logits through it equal transformers' (float32, eager)."""

from __future__ import annotations

from typing import Any, Iterator

import mlx.core as mx
import numpy as np
import pytest
import tiny_checkpoints as tc
import torch

import mlx_engine
from mlx_engine.models import cpu_parallel


@pytest.fixture
def two_streams(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two CPU streams whatever this machine's core count (the split is under test, not the count)."""
    monkeypatch.setenv(cpu_parallel.STREAMS_VARIABLE, "2")
    cpu_parallel.cpu_streams.cache_clear()
    yield
    cpu_parallel.cpu_streams.cache_clear()


def _qkv(heads: int, kv_heads: int, rows: int, keys: int, dim: int = 32) -> tuple[mx.array, mx.array, mx.array]:
    rng = np.random.default_rng(rows * 7 + keys)
    q, k, v = (mx.array(rng.normal(size=(1, h, n, dim)).astype(np.float32)) for h, n in ((heads, rows), (kv_heads, keys), (kv_heads, keys)))
    return q, k, v


def _worth_splitting(queries: mx.array, n_keys: int) -> bool:
    """The split's own test for an attention call of these queries over n_keys keys."""
    n_heads, n_rows = queries.shape[1], queries.shape[2]
    return cpu_parallel._worth_splitting(n_rows, n_heads * n_rows * n_keys)


def _windowed_mask(rows: int, keys: int, window: int) -> mx.array:
    query = mx.arange(keys - rows, keys)[:, None]
    key = mx.arange(keys)[None, :]
    return (key <= query) & (key > query - window)


CASES = {
    "causal, first chunk": dict(rows=512, keys=512, mask="causal"),
    "causal, a later chunk over earlier keys": dict(rows=512, keys=1536, mask="causal"),
    "causal, rows not a multiple of a block": dict(rows=333, keys=700, mask="causal"),
    "no mask": dict(rows=300, keys=300, mask=None),
    "sliding-window array mask": dict(rows=384, keys=1024, mask="window"),
    "a batch's [B, 1, T, S] array mask": dict(rows=256, keys=512, mask="batch"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sinks", [False, True])
def test_split_attention_equals_the_one_stream_kernel(two_streams: None, case: str, sinks: bool) -> None:
    spec = CASES[case]
    rows, keys = spec["rows"], spec["keys"]
    q, k, v = _qkv(8, 2, rows, keys)  # grouped-query: 4 query heads per key head
    mask: Any = spec["mask"]
    if mask == "window":
        mask = _windowed_mask(rows, keys, 200)
    elif mask == "batch":
        causal = _windowed_mask(rows, keys, keys)
        mask = mx.stack([causal, causal & (mx.arange(keys) >= 40)[None, :]])[:, None]  # row 1 left-padded by 40
        q, k, v = (mx.concatenate([a, a * 0.5]) for a in (q, k, v))
    sink = mx.array(np.linspace(-1.0, 2.0, 8).astype(np.float32)) if sinks else None
    assert _worth_splitting(q, keys), "the case must be large enough to be split"
    split = cpu_parallel.scaled_dot_product_attention(q, k, v, scale=0.17, mask=mask, sinks=sink)
    whole = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.17, mask=mask, sinks=sink)
    assert split.shape == whole.shape
    np.testing.assert_allclose(np.array(split), np.array(whole), atol=1e-5, rtol=1e-5)  # float32 rounding only


def test_a_causal_block_reads_exactly_the_keys_its_last_query_sees() -> None:
    for rows, keys in ((512, 512), (512, 4096), (333, 700)):
        plan = cpu_parallel._causal_plan(rows, keys, 2, causal=True)
        assert [start for start, *_ in plan] == sorted(start for start, *_ in plan)
        covered = []
        for start, end, span, stream in plan:
            covered.extend(range(start, end))
            assert span == keys - (rows - end)  # query end-1 sits at key position span-1
            assert stream in (0, 1)
        assert covered == list(range(rows))
        loads = [0, 0]
        for start, end, span, stream in plan:
            loads[stream] += (end - start) * span
        assert max(loads) <= 1.1 * sum(loads) / 2 or len(plan) >= 8, (rows, keys, loads)


def test_the_split_is_off_for_one_stream_a_decode_step_and_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_parallel.STREAMS_VARIABLE, "1")
    cpu_parallel.cpu_streams.cache_clear()
    try:
        assert cpu_parallel.cpu_streams() == ()
        assert not _worth_splitting(_qkv(8, 2, 512, 512)[0], 512)
    finally:
        cpu_parallel.cpu_streams.cache_clear()
    monkeypatch.setenv(cpu_parallel.STREAMS_VARIABLE, "2")
    cpu_parallel.cpu_streams.cache_clear()
    try:
        assert not _worth_splitting(_qkv(8, 2, 1, 4096)[0], 4096)  # one new token
        assert not _worth_splitting(_qkv(4, 2, 32, 32)[0], 32)
    finally:
        cpu_parallel.cpu_streams.cache_clear()


@pytest.mark.parametrize("value", ["0", "two", "-3"])
def test_a_bad_stream_count_is_refused_with_what_to_set(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(cpu_parallel.STREAMS_VARIABLE, value)
    cpu_parallel.cpu_streams.cache_clear()
    try:
        with pytest.raises(ValueError, match="MLX_ENGINE_CPU_STREAMS must be a whole number"):
            cpu_parallel.cpu_streams()
    finally:
        cpu_parallel.cpu_streams.cache_clear()


MODELS = {
    "llama": (lambda p: tc.build_llama(p, "llama"), "LlamaForCausalLM"),
    "gpt_oss": (tc.build_gpt_oss, "GptOssForCausalLM"),  # sinks, and sliding-window layers' array masks
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_long_prompt_through_split_attention_matches_transformers(
    two_streams: None, name: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    build, cls_name = MODELS[name]
    plans: list[int] = []
    real_plan = cpu_parallel._causal_plan

    def counted_plan(*args: Any, **kwargs: Any) -> Any:
        plans.append(len(plan := real_plan(*args, **kwargs)))
        return plan

    monkeypatch.setattr(cpu_parallel, "_causal_plan", counted_plan)
    path, _ = build(tmp_path_factory.mktemp(name))
    kit = mlx_engine.load_model(path)
    reference = tc.load_reference(path, cls_name)
    ids = [int(t) for t in np.random.default_rng(1).integers(3, kit.arch_info.vocab_size, size=300)]
    assert _worth_splitting(mx.zeros((1, kit.arch_info.n_heads, len(ids), 1)), len(ids))
    with torch.no_grad():
        out = reference(torch.tensor([ids]), output_attentions=True)
    expected = out.logits[0].numpy()
    expected_pattern = out.attentions[1][0].numpy()  # [heads, T, T]
    pattern_hook = [{"layer_name": 1, "component": "attention_pattern"}]
    for step in (len(ids), 128):  # one forward; then chunks over earlier keys
        fused = mlx_engine.run_with_cache(kit, ids, [], prefill_step_size=step)
        np.testing.assert_allclose(np.array(fused.logits), expected, atol=1e-4, rtol=1e-4, err_msg=f"fused, chunks of {step}")
        explicit = mlx_engine.run_with_cache(kit, ids, pattern_hook, prefill_step_size=step)  # the explicit path's split softmax
        np.testing.assert_allclose(np.array(explicit.logits), expected, atol=1e-4, rtol=1e-4, err_msg=f"explicit, chunks of {step}")
        capture = explicit.capture("layers.1.attention_pattern")
        pattern = np.array(capture.array)
        columns = list(capture.key_positions) if capture.key_positions is not None else list(range(len(ids)))
        assert pattern.shape == (kit.arch_info.n_heads, len(ids), len(columns))
        np.testing.assert_allclose(pattern, expected_pattern[:, :, columns], atol=1e-5, err_msg=f"pattern, chunks of {step}")
    assert plans and min(plans) >= 2, "the fused path must have been split"
