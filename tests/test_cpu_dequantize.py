"""`load_model(cpu_dequantize=True)`: float32 layers from a 4/8-bit checkpoint, same model.

The reference is the quantized model itself: its kernels compute with `mx.dequantize` of the
same codes and scales (which `mlx-engine verify` proves against transformers), so the
dequantized model's logits and captures must equal it up to the order of float additions.
Tolerance: 1e-4 relative to the largest magnitude (float32 sums over d_model terms; the
quantized kernel accumulates in another order).
"""

from __future__ import annotations

from pathlib import Path

import mlx_engine  # noqa: F401,I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_engine import cpu_dequantize
from mlx_engine.loading import ModelLoadError
from mlx_engine.tools.convert import quantize_checkpoint

PROMPT = "def add(a, b):\n    return a + b\n"
HOOKS = ["layers.0.residual", "layers.1.attention_pattern", "layers.1.mlp_post"]


def close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> bool:
    return bool(np.max(np.abs(got - want)) <= rel * max(1.0, float(np.max(np.abs(want)))))


def no_quantized_layers(kit) -> bool:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return not any(isinstance(m, kinds) for _, m in kit.model.named_modules())


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_llama_equals_the_quantized_one(llama_checkpoint: Path, tmp_path: Path, bits: int) -> None:
    path = quantize_checkpoint(llama_checkpoint, tmp_path / f"q{bits}", bits=bits, group_size=32)
    quantized = mlx_engine.load_model(path)
    floats = mlx_engine.load_model(path, cpu_dequantize=True)
    assert quantized.dequantized is None and no_quantized_layers(floats)
    assert "float32" in floats.dequantized and "MiB" in floats.dequantized
    assert all(v.dtype in (mx.float32, mx.uint32, mx.int32) for _, v in tree_flatten(floats.model.parameters()))
    ids = mlx_engine.tokenize(quantized, PROMPT)
    want = mlx_engine.run_with_cache(quantized, ids, HOOKS)
    got = mlx_engine.run_with_cache(floats, ids, HOOKS)
    assert close(np.array(got.logits), np.array(want.logits))
    for hook in HOOKS:
        assert close(np.array(got[hook]), np.array(want[hook]))
    greedy = [r.token for r in mlx_engine.create_generator(quantized, ids, max_tokens=8)]
    assert [r.token for r in mlx_engine.create_generator(floats, ids, max_tokens=8)] == greedy


def test_dequantized_default_model_equals_the_shipped_4bit_one() -> None:
    default_kit = mlx_engine.load_model("default")
    floats = mlx_engine.load_model("default", cpu_dequantize=True)
    assert no_quantized_layers(floats)
    ids = mlx_engine.tokenize(default_kit, PROMPT)
    hooks = ["layers.1.residual", "layers.2.expert_post", "layers.3.router"]
    want = mlx_engine.run_with_cache(default_kit, ids, hooks)
    got = mlx_engine.run_with_cache(floats, ids, hooks)
    assert close(np.array(got.logits), np.array(want.logits))
    for hook in hooks:
        assert close(np.array(got[hook]), np.array(want[hook]))


def test_a_model_too_large_for_memory_is_refused_before_converting(llama_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    path = quantize_checkpoint(llama_checkpoint, tmp_path / "q4", bits=4, group_size=32)
    monkeypatch.setattr(cpu_dequantize, "_physical_memory", lambda: 1024)
    with pytest.raises(ModelLoadError, match=r"as float32 the weights would take .* load the model quantized"):
        mlx_engine.load_model(path, cpu_dequantize=True)


def test_a_float_model_is_left_as_it_is(llama_kit) -> None:
    kit = mlx_engine.load_model(llama_kit.path, cpu_dequantize=True)
    assert kit.dequantized.startswith("dequantized 0 quantized layers")
