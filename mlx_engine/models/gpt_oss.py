"""gpt-oss: attention with sinks over alternating sliding/full layers, YaRN RoPE, and a
top-k mixture of experts with a clamped SwiGLU.

Module names follow mlx-lm's `gpt_oss.py`, so MLX conversions (mlx-community's 4- and
8-bit folders) load unchanged; `Model.sanitize` also reads the float layout
transformers 5 writes and OpenAI's original MXFP4 layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.switch_layers import SwitchGLU

from ..hooks.architecture import ArchitectureInfo
from .attention import attend, layer_masks
from .base import BlockHooks, InstrumentedModel, ModelHooks
from .rope import lift_rope_parameters, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "gpt_oss"
    num_hidden_layers: int = 36
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    vocab_size: int = 201088
    rms_norm_eps: float = 1e-05
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: Optional[int] = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_scaling: Optional[dict[str, Any]] = None
    # transformers 5 writes rope_theta and the scaling here; it wins over the old keys.
    rope_parameters: Optional[dict[str, Any]] = None
    max_position_embeddings: int = 131072
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    layer_types: Optional[list[str]] = None

    def __post_init__(self) -> None:
        lift_rope_parameters(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            # gpt-oss starts with a sliding-window layer and alternates.
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)


def topk(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest logits and their indices, in no particular order (like torch.topk's set)."""
    indices = mx.stop_gradient(mx.argpartition(logits, kth=-k, axis=-1)[..., -k:])
    return mx.take_along_axis(logits, indices, axis=-1), indices


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.window = args.sliding_window if layer_type == "sliding_attention" else None
        self.scale = 1.0 / math.sqrt(args.head_dim)

        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=True)
        # One learned logit per head that competes in the softmax but carries no value.
        self.sinks = mx.zeros((self.n_heads,))
        self.rope = make_rope(self.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(
        self,
        x: mx.array,
        hooks: BlockHooks,
        mask: Union[None, str, mx.array] = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim).swapaxes(1, 2)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).swapaxes(1, 2)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim).swapaxes(1, 2)

        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)

        out = attend(
            q,
            k,
            v,
            hooks=hooks,
            cache=cache,
            scale=self.scale,
            mask=mask,
            window=self.window,
            sinks=self.sinks,
        )
        return self.o_proj(out.swapaxes(1, 2).reshape(B, L, -1))


class HookedSwitchGLU(SwitchGLU):
    """mlx-lm's SwitchGLU with the routed experts' hidden units as hook points.

    `expert_pre` sees each routed expert's gate pre-activation and `expert_post` the
    hidden units entering its down projection, both [B, T, k, d_expert] in token order.
    For many tokens SwitchGLU computes in expert-sorted order; an armed site is handed
    the tensor unsorted (and an edit sorted back), an unarmed one costs nothing.
    """

    def __call__(self, x: mx.array, indices: mx.array, hooks: Optional[BlockHooks] = None) -> mx.array:
        pre, post = (hooks.expert_pre, hooks.expert_post) if hooks is not None else (None, None)
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= 64
        idx, order = indices, None
        if do_sort:
            order = mx.argsort(indices.flatten())
            x, idx = x.flatten(0, -3)[order // indices.shape[-1]], indices.flatten()[order]
        x_up = self.up_proj(x, idx, sorted_indices=do_sort)
        x_gate = _expert_site(pre, self.gate_proj(x, idx, sorted_indices=do_sort), indices, order)
        hidden = _expert_site(post, self.activation(x_up, x_gate), indices, order)
        out = self.down_proj(hidden, idx, sorted_indices=do_sort)
        if do_sort:
            out = mx.unflatten(out[mx.argsort(order)], 0, indices.shape)
        return out.squeeze(-2)


def _expert_site(point: Any, h: mx.array, indices: mx.array, order: Optional[mx.array]) -> mx.array:
    """Hand an armed expert site its tensor as [B, T, k, d] in token order; return the (edited) tensor in h's layout."""
    if point is None or point.fn is None:
        return h
    if order is None:  # [B, T, k, 1, d]
        return point(h.squeeze(-2), experts=indices)[..., None, :]
    inverse = mx.argsort(order)
    tokens = mx.unflatten(h[inverse], 0, indices.shape).squeeze(-2)  # [B, T, k, d]
    edited = point(tokens, experts=indices)
    if edited is tokens:
        return h
    return edited.reshape(-1, 1, edited.shape[-1])[order]


class MLP(nn.Module):
    """Router, top-k experts, and the routing-weighted sum of their outputs."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.experts_per_token = args.num_experts_per_tok
        self.router = nn.Linear(args.hidden_size, args.num_local_experts, bias=True)
        self.experts = HookedSwitchGLU(
            input_dims=args.hidden_size,
            hidden_dims=args.intermediate_size,
            num_experts=args.num_local_experts,
            activation=SwigluOAI(alpha=args.swiglu_alpha, limit=args.swiglu_limit),
            bias=True,
        )

    def route(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        chosen, indices = topk(logits, self.experts_per_token)
        return indices, mx.softmax(chosen, axis=-1, precise=True)

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        logits = self.router(x)
        indices, weights = self.route(logits)
        edited = hooks.router(logits, experts=indices, weights=weights)
        if edited is not logits:
            # An intervention on the router logits changes which experts run.
            indices, weights = self.route(edited)
        y = self.experts(x, indices, hooks)
        return (y * weights[..., None]).sum(axis=-2)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer_type = args.layer_types[layer]
        self.self_attn = Attention(args, self.layer_type)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hooks = BlockHooks(layer, moe=True)

    def __call__(self, x: mx.array, mask: Union[None, str, mx.array], cache: Any = None) -> mx.array:
        hooks = self.hooks
        x = hooks.resid_pre(x)
        h = hooks.layernorm(self.input_layernorm(x))
        x = x + hooks.attention(self.self_attn(h, hooks, mask, cache))
        x = hooks.resid_mid(x)
        m = hooks.mlp_in(self.post_attention_layernorm(x))
        m = hooks.mlp(self.mlp(m, hooks))
        return hooks.residual(x + m)


class GptOssMoeModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.window = args.sliding_window
        self.hooks = ModelHooks()

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        x = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        x = self.hooks.embedding(x)
        if cache is None:
            cache = [None] * len(self.layers)

        for layer, c, mask in zip(self.layers, cache, layer_masks(x, cache, self.layers, self.window)):
            x = layer(x, mask, c)
        return self.hooks.final_norm(self.norm(x))


class Model(nn.Module, InstrumentedModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = GptOssMoeModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        last_only: bool = False,
    ) -> mx.array:
        """`last_only` applies the LM head to the last position alone: a prompt pass keeps only
        that position's logits, and the head is a large share of a small model's work."""
        out = self.model(inputs, cache, input_embeddings)
        return self.lm_head(out[:, -1:, :] if last_only else out)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Split the experts' fused, interleaved gate/up projection into SwitchGLU's weights.

        Three layouts reach here: MLX conversions (already split, passed through),
        transformers 5's float tensors (`gate_up_proj` [E, hidden, 2I], used as x @ W),
        and the original MXFP4 tensors (`*_blocks` [E, out, in/32, 16] FP4 nibbles and
        `*_scales` [E, out, in/32] E8M0, which are exactly MLX's mxfp4 packing).
        Gate and up columns alternate: gate = [::2], up = [1::2].
        """
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if any("experts.gate_proj." in k for k in weights):
            return weights

        sanitized = {}
        for k, v in weights.items():
            if k.endswith("experts.gate_up_proj"):
                # [E, hidden, 2I] (x @ W) -> [E, I, hidden] per projection.
                sanitized[k.replace("gate_up_proj", "gate_proj.weight")] = mx.contiguous(v[..., ::2].swapaxes(-1, -2))
                sanitized[k.replace("gate_up_proj", "up_proj.weight")] = mx.contiguous(v[..., 1::2].swapaxes(-1, -2))
            elif k.endswith("experts.down_proj"):
                sanitized[k.replace("down_proj", "down_proj.weight")] = mx.contiguous(v.swapaxes(-1, -2))
            elif k.endswith("experts.gate_up_proj_blocks") or k.endswith("experts.gate_up_proj_scales"):
                packed, suffix = _mxfp4_tensor(k, v)
                base = k.rsplit(".", 1)[0]
                sanitized[f"{base}.gate_proj.{suffix}"] = mx.contiguous(packed[..., ::2, :])
                sanitized[f"{base}.up_proj.{suffix}"] = mx.contiguous(packed[..., 1::2, :])
            elif k.endswith("experts.down_proj_blocks") or k.endswith("experts.down_proj_scales"):
                packed, suffix = _mxfp4_tensor(k, v)
                sanitized[f"{k.rsplit('.', 1)[0]}.down_proj.{suffix}"] = packed
            elif k.endswith("experts.gate_up_proj_bias"):
                sanitized[k.replace("gate_up_proj_bias", "gate_proj.bias")] = mx.contiguous(v[..., ::2])
                sanitized[k.replace("gate_up_proj_bias", "up_proj.bias")] = mx.contiguous(v[..., 1::2])
            elif k.endswith("experts.down_proj_bias"):
                sanitized[k.replace("down_proj_bias", "down_proj.bias")] = v
            else:
                sanitized[k] = v
        return sanitized

    @property
    def arch_info(self) -> ArchitectureInfo:
        a = self.args
        return ArchitectureInfo(
            model_type=a.model_type,
            num_layers=a.num_hidden_layers,
            d_model=a.hidden_size,
            n_heads=a.num_attention_heads,
            n_kv_heads=a.num_key_value_heads,
            head_dim=a.head_dim,
            vocab_size=a.vocab_size,
            d_mlp=a.intermediate_size,
            n_experts=a.num_local_experts,
            experts_per_token=a.num_experts_per_tok,
            sliding_window=a.sliding_window,
            layer_types=tuple(a.layer_types),
            block_prefix="model.layers",
        )

    @property
    def quant_predicate(self) -> Callable[[str, nn.Module], Union[bool, dict]]:
        def predicate(path: str, _: nn.Module) -> Union[bool, dict]:
            # Routing decisions are sensitive; mlx-community conversions keep the router at 8 bits.
            if path.endswith("router"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate


def _mxfp4_tensor(key: str, value: mx.array) -> tuple[mx.array, str]:
    """An original-layout MXFP4 tensor as MLX's packing: blocks -> uint32 words, scales as is."""
    if key.endswith("_blocks"):
        # [..., in/32, 16] bytes -> [..., in/8] words, nibble order unchanged (low nibble first).
        return value.view(mx.uint32).flatten(-2), "weight"
    return value, "scales"
