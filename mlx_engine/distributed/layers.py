"""Sharded layers the native blocks need beyond mlx-lm's: expert layers and a split RMS norm.

`ShardedRMSNorm` is OLMo 2's q_norm/k_norm once the heads are split: those norms run over
all heads at once, so each rank sums the squares of its slice, the sums are added over the
ranks (one all_sum of one number per position), and each rank scales its own slice.

Experts: mlx-lm shards an MoE's experts in place and adds one `all_sum` in the MoE block's own
forward (its `sharding_group`). Our MoE blocks are the model files' own classes, which this
package does not edit, so the sum moves into the experts' down projection instead: each rank
multiplies its slice of the hidden units, the ranks' partial outputs are summed, and the bias
is added once after the sum, as `ShardedToAllLinear` does. Summing the k routed experts'
outputs before or after the all_sum is the same linear map; the cost is k rows per token on
the wire instead of one.
"""

from __future__ import annotations

from typing import Any, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear


class ShardedToAllSwitchLinear(SwitchLinear):
    """A SwitchLinear over this rank's slice of the input units; every rank gets the whole output."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool, group: Any) -> None:
        super().__init__(input_dims, output_dims, num_experts, bias=bias)
        self.group = group

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        x = mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        x = mx.distributed.all_sum(x, group=self.group)
        if "bias" in self:
            x = x + mx.expand_dims(self["bias"][indices], -2)
        return x


class QuantizedShardedToAllSwitchLinear(QuantizedSwitchLinear):
    """The quantized ShardedToAllSwitchLinear: this rank's groups of input units, summed over ranks."""

    def __init__(
        self, input_dims: int, output_dims: int, num_experts: int, bias: bool, group_size: int, bits: int, mode: str, group: Any
    ) -> None:
        super().__init__(input_dims, output_dims, num_experts, bias=bias, group_size=group_size, bits=bits, mode=mode)
        self.group = group

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        x = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        x = mx.distributed.all_sum(x, group=self.group)
        if "bias" in self:
            x = x + mx.expand_dims(self["bias"][indices], -2)
        return x


SwitchLayer = Union[SwitchLinear, QuantizedSwitchLinear]


def sharded_to_all_switch(layer: SwitchLayer, group: Any) -> SwitchLayer:
    """`layer` split on its input units over `group`, its outputs summed over the ranks."""
    n = group.size()
    experts, out_dims, in_dims = layer.num_experts, layer.output_dims, layer.input_dims
    has_bias = "bias" in layer
    if isinstance(layer, QuantizedSwitchLinear):
        if layer.global_scale is not None:
            raise ValueError("experts quantized with a global scale (nvfp4) cannot be sharded yet.")
        new: SwitchLayer = QuantizedShardedToAllSwitchLinear(
            in_dims // n, out_dims, experts, has_bias, layer.group_size, layer.bits, layer.mode, group
        )
    else:
        new = ShardedToAllSwitchLinear(in_dims // n, out_dims, experts, has_bias, group)
    # The sharded-to-all predicate splits weights (and quantization scales/biases) on the
    # input axis and leaves the bias whole: it is added once, after the sum.
    shard_inplace(layer, "sharded-to-all", group=group)
    new.update(layer.parameters())
    return new


def shard_switch_glu(glu: Any, group: Any) -> None:
    """Split a SwitchGLU's hidden units over `group`: gate and up by output, down by input."""
    shard_inplace(glu.gate_proj, "all-to-sharded", group=group)
    shard_inplace(glu.up_proj, "all-to-sharded", group=group)
    glu.down_proj = sharded_to_all_switch(glu.down_proj, group)


class ShardedRMSNorm(nn.Module):
    """An RMS norm over a feature axis split in contiguous blocks over `group`: this rank's block.

    The mean of squares is over the whole width (the ranks' sums added), in float32 as
    mx.fast.rms_norm accumulates; the weight is this rank's block of the norm's weight.
    """

    def __init__(self, norm: nn.RMSNorm, group: Any) -> None:
        super().__init__()
        n, r = group.size(), group.rank()
        self.dims = norm.weight.shape[0]
        self.eps = norm.eps
        self.group = group
        self.weight = mx.contiguous(mx.split(norm.weight, n)[r])

    def __call__(self, x: mx.array) -> mx.array:
        squares = mx.sum(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True)
        mean = mx.distributed.all_sum(squares, group=self.group) / self.dims
        return (x.astype(mx.float32) * mx.rsqrt(mean + self.eps)).astype(x.dtype) * self.weight
