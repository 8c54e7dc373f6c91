"""Qwen 3 MoE: Qwen 3's attention over blocks whose MLP is a top-k mixture of experts,
except the dense blocks the config names.

As transformers builds it (the reference):
- Routing: softmax over all experts' logits (float32), the k largest probabilities, divided by
  their sum only with `norm_topk_prob`; the weighted sum of the k experts' SwiGLU outputs.
- Block i is sparse when i is not in `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0;
  the others carry a dense MLP of `intermediate_size` (the experts use `moe_intermediate_size`).
- `head_dim` defaults to hidden_size / heads (unlike dense Qwen 3's 128); a sliding window,
  when `use_sliding_window` is set, applies to every layer (max_window_layers and layer_types
  are not read). transformers 5 writes `num_experts` as `num_local_experts`.

Module names follow mlx-lm's `qwen3_moe.py` (`mlp.gate`, `mlp.switch_mlp`), so MLX conversions
load unchanged; `Model.sanitize` stacks transformers' per-expert tensors into them.

Hook sites: sparse blocks have router / expert_pre / expert_post, dense blocks mlp_pre /
mlp_post. The listing (one component set for all layers) offers the expert sites and the
experts' width as d_mlp; a request for an expert site of a dense block is a HookSpecError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from ..hooks.architecture import ArchitectureInfo
from ..hooks.names import HookSpecError
from ..hooks.point import HookPoint
from . import qwen3
from .base import BlockHooks
from .gpt_oss import HookedSwitchGLU, topk
from .rope import lift_rope_parameters

EXPERT_SITES = ("router", "expert_pre", "expert_post")
_PER_EXPERT = re.compile(r"^(?P<mlp>.+\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<param>\w+)$")


@dataclass
class ModelArgs(BaseModelArgs):
    """Qwen3MoeConfig's fields, with transformers' defaults where a config.json leaves one out."""

    model_type: str = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 4
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: Optional[bool] = None  # None: transformers' default, untied
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rope_parameters: Optional[dict[str, Any]] = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 4096
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    # transformers 5's name for num_experts; it wins when both are written, as in transformers.
    num_local_experts: Optional[int] = None
    norm_topk_prob: bool = False
    mlp_only_layers: Optional[list[int]] = None

    def __post_init__(self) -> None:
        lift_rope_parameters(self)
        qwen3.resolve_tie(self)
        if self.num_local_experts is not None:
            self.num_experts = self.num_local_experts
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if not self.use_sliding_window:
            self.sliding_window = None
        kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
        self.layer_types = [kind] * self.num_hidden_layers

    def is_sparse(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


class SparseMoeBlock(nn.Module):
    """Router (`gate`), top-k experts, and the routing-weighted sum of their outputs."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = HookedSwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def route(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """(expert indices, weights) [B, T, k]: the top-k of the float32 softmax, renormalised if asked."""
        probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
        weights, indices = topk(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return indices, weights.astype(logits.dtype)

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        logits = self.gate(x)
        indices, weights = self.route(logits)
        edited = hooks.router(logits, experts=indices, weights=weights)
        if edited is not logits:
            # An intervention on the router logits changes which experts run.
            indices, weights = self.route(edited)
        y = self.switch_mlp(x, indices, hooks)
        return (y * weights[..., None]).sum(axis=-2)


class TransformerBlock(qwen3.TransformerBlock):
    """Qwen 3's block with the MLP the config gives this layer: experts or dense."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer, mlp=SparseMoeBlock(args) if args.is_sparse(layer) else None)


class HookPoints(dict):
    """The model's hook points; asking for an expert site of a dense block raises a HookSpecError
    that says why (the hook session looks sites up here after resolution, which cannot tell
    the layers apart)."""

    def __init__(self, points: dict[str, HookPoint], dense_layers: Iterable[int], sparse_layers: Iterable[int]) -> None:
        super().__init__(points)
        self.dense_layers = frozenset(dense_layers)
        self.sparse_layers = tuple(sorted(sparse_layers))

    def __missing__(self, key: str) -> HookPoint:
        match = re.fullmatch(r"layers\.(\d+)\.(\w+)", key)
        if match and int(match[1]) in self.dense_layers and match[2] in EXPERT_SITES:
            layer, site = int(match[1]), match[2]
            raise HookSpecError(
                f"{key} does not exist: layer {layer} of this mixture-of-experts model has a dense MLP "
                f"(mlp_only_layers / decoder_sparse_step), so no {site}. The listing names one component set "
                f"for every layer; the router and expert sites exist at layers {', '.join(map(str, self.sparse_layers))}."
            )
        raise KeyError(key)


class Model(qwen3.Model):
    block: type = TransformerBlock

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Stack the experts into SwitchGLU's [E, out, in] tensors (`mlp.switch_mlp.*`).

        Three layouts reach here: MLX conversions (already stacked, passed through), the Hub's
        per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, what transformers 4 and 5 save),
        and transformers 5's in-memory fused tensors (`mlp.experts.gate_up_proj` [E, 2I, H],
        gate rows first, and `mlp.experts.down_proj` [E, H, I]).
        """
        weights = super().sanitize(weights)
        n = self.args.num_experts
        stacks: dict[tuple[str, str, str], dict[int, mx.array]] = {}
        out: dict[str, mx.array] = {}
        for k, v in weights.items():
            per_expert = _PER_EXPERT.match(k)
            if per_expert:
                key = (per_expert["mlp"], per_expert["proj"], per_expert["param"])
                stacks.setdefault(key, {})[int(per_expert["expert"])] = v
            elif k.endswith(".mlp.experts.gate_up_proj"):
                mlp, half = k[: -len(".experts.gate_up_proj")], v.shape[-2] // 2
                out[f"{mlp}.switch_mlp.gate_proj.weight"] = mx.contiguous(v[..., :half, :])
                out[f"{mlp}.switch_mlp.up_proj.weight"] = mx.contiguous(v[..., half:, :])
            elif k.endswith(".mlp.experts.down_proj"):
                out[f"{k[: -len('.experts.down_proj')]}.switch_mlp.down_proj.weight"] = v
            else:
                out[k] = v
        for (mlp, proj, param), by_expert in stacks.items():
            if sorted(by_expert) != list(range(n)):
                raise ValueError(f"{mlp}.experts.*.{proj}.{param}: expected experts 0..{n - 1}, found {sorted(by_expert)}.")
            out[f"{mlp}.switch_mlp.{proj}.{param}"] = mx.stack([by_expert[e] for e in range(n)])
        return out

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.sparse]

    def hook_points(self) -> dict[str, HookPoint]:
        sparse = self.sparse_layers
        dense = [i for i in range(len(self.layers)) if i not in sparse]
        return HookPoints(super().hook_points(), dense, sparse)

    @property
    def arch_info(self) -> ArchitectureInfo:
        a = self.args
        info = super().arch_info
        if not self.sparse_layers:  # every block dense: a dense model in all but name
            return info
        return replace(info, d_mlp=a.moe_intermediate_size, n_experts=a.num_experts, experts_per_token=a.num_experts_per_tok)

    @property
    def quant_predicate(self) -> Callable[[str, nn.Module], Union[bool, dict]]:
        def predicate(path: str, _: nn.Module) -> Union[bool, dict]:
            # Routing decisions are sensitive; mlx-community conversions keep the router at 8 bits.
            if path.endswith("mlp.gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate
