"""Dequantizing a 4/8-bit model to float32 at load, for MLX's CPU backend.

Why: MLX's quantized matmul on the CPU runs on one thread, so a small 4-bit model decodes
several times slower than its float original would (benchmarks/RESULTS.md), while float32
matmuls go through the multi-threaded BLAS. On the CPU a model that fits in memory as float32
is therefore faster dequantized. The weights are exactly those the quantized kernels compute
with (`mx.dequantize` of the same codes and scales), so logits and captures equal the
quantized model's up to the order of floating-point additions; the cost is memory: each
weight takes 4 bytes instead of bits/8 plus its scales, stated in the returned report.

On a GPU backend (Metal, CUDA) the quantized kernels are the fast path, and this is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# A dequantized model may use at most this share of the machine's memory: the rest is for
# the KV cache, captures and the process itself.
MEMORY_SHARE = 0.75


class CPUDequantizeError(ValueError):
    """The model cannot be dequantized here (not the CPU backend, or too large as float32)."""


@dataclass(frozen=True)
class DequantizeReport:
    """What dequantizing changed: the layers converted and the weights' bytes before and after."""

    layers: int
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        mib = 2**20
        return (
            f"dequantized {self.layers} quantized layers to float32 for the CPU backend: weights "
            f"{self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB"
        )


def _weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound known
        return 0


def dequantize_for_cpu(model: nn.Module) -> DequantizeReport:
    """Replace every quantized layer of `model` by its float32 equivalent, in place.

    Raises CPUDequantizeError on a GPU backend, and when the float32 weights would take more
    than MEMORY_SHARE of physical memory (naming both numbers), before converting anything.
    """
    if mx.default_device() != mx.cpu:
        raise CPUDequantizeError(
            f"cpu_dequantize is for MLX's CPU backend; this process runs on {mx.default_device()}, where the "
            "quantized kernels are the fast path. Load the model without it."
        )
    quantized = _quantized_modules(model)
    before = _weight_bytes(model)
    if not quantized:
        return DequantizeReport(layers=0, bytes_before=before, bytes_after=before)
    quantized_ids = {id(v) for _, m in quantized for _, v in tree_flatten(m.parameters())}
    other = [v for _, v in tree_flatten(model.parameters()) if id(v) not in quantized_ids]
    float_bytes = sum(4 * v.size if mx.issubdtype(v.dtype, mx.floating) else v.nbytes for v in other)
    for _, m in quantized:
        rows, packed = m.weight.shape[-2], m.weight.shape[-1]
        cols = packed * 32 // m.bits
        float_bytes += 4 * cols * rows * (m.weight.size // (rows * packed))
    after = float_bytes
    memory = _physical_memory()
    if memory and after > MEMORY_SHARE * memory:
        raise CPUDequantizeError(
            f"as float32 the weights would take {after / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of this "
            f"machine's {memory / 2**30:.1f} GiB; load the model quantized (without cpu_dequantize)."
        )
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    # mx.dequantize returns the scales' dtype (often bfloat16): float32 is the CPU's fast BLAS type.
    model.update(_as_float32(model.parameters()))
    mx.eval(model.parameters())
    return DequantizeReport(layers=len(quantized), bytes_before=before, bytes_after=_weight_bytes(model))


def _as_float32(tree):  # type: ignore[no-untyped-def]
    if isinstance(tree, dict):
        return {k: _as_float32(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_as_float32(v) for v in tree]
    if isinstance(tree, mx.array) and mx.issubdtype(tree.dtype, mx.floating):
        return tree.astype(mx.float32)
    return tree
