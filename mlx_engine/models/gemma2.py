"""Gemma 2: sandwich norms, GeGLU, soft-capped attention and logits, alternating sliding windows.

What sets it apart from Llama, each as transformers' `modeling_gemma2.py` computes it:
- the token embedding is scaled by sqrt(hidden_size), the factor rounded to the embedding's dtype;
- RMSNorm scales by (1 + weight), in float32, and casts back;
- four norms per block: the attention and MLP outputs are normalised again before each residual add;
- the MLP is GeGLU with `hidden_activation` (gelu_pytorch_tanh);
- attention scores are scaled by query_pre_attn_scalar**-0.5, not head_dim**-0.5, and soft-capped
  (`attn_logit_softcapping`), which always takes attend()'s explicit path;
- the logits are soft-capped (`final_logit_softcapping`);
- layers alternate sliding-window and full attention (`layer_types`, by default even layers slide).
  mlx-lm 0.32's gemma2.py attends over every key on every layer; this file keeps the window.

Parameter names are those of transformers' checkpoints and mlx-lm's conversions alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from ..hooks.architecture import ArchitectureInfo
from .attention import attend, layer_masks
from .base import BlockHooks, InstrumentedModel, ModelHooks
from .lm_head import sanitize_lm_head
from .rope import lift_rope_parameters, make_rope

ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu": nn.gelu,
}
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class ModelArgs(BaseModelArgs):
    """config.json's fields; every default is transformers' Gemma2Config default, for keys a config omits."""

    model_type: str = "gemma2"
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = 4
    head_dim: Optional[int] = 256
    vocab_size: int = 256000
    rms_norm_eps: float = 1e-6
    # transformers 4 configs also carry `hidden_act`, which Gemma 2 never reads.
    hidden_activation: Optional[str] = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rope_parameters: Optional[dict[str, Any]] = None
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: Optional[float] = 50.0
    final_logit_softcapping: Optional[float] = 30.0
    sliding_window: Optional[int] = 4096
    layer_types: Optional[list[str]] = None
    tie_word_embeddings: Optional[bool] = None  # transformers' Gemma 2 default: tied
    use_bidirectional_attention: Optional[bool] = None

    def __post_init__(self) -> None:
        self.tie_word_embeddings_given = self.tie_word_embeddings is not None
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = True
        lift_rope_parameters(self)
        if self.use_bidirectional_attention:
            raise ValueError("Gemma 2 with use_bidirectional_attention is not supported: this file is causal only.")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_activation is None:
            self.hidden_activation = "gelu_pytorch_tanh"
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"Gemma 2 hidden_activation {self.hidden_activation!r} is not one of {sorted(ACTIVATIONS)}.")
        if self.layer_types is None:
            # transformers' default (and transformers 4's only) pattern: even layers slide.
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"Gemma 2 layer_types must name {self.num_hidden_layers} of {LAYER_TYPES}; got {self.layer_types}.")
        if self.sliding_window is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers


def softcap(x: mx.array, cap: Optional[float]) -> mx.array:
    """cap * tanh(x / cap): bounds x smoothly to (-cap, cap); None leaves x as it is."""
    return x if cap is None else mx.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the stored weight is an offset from 1, and the whole norm is computed
    in float32 before the cast back (transformers: `(x * w).to(dtype)`, not `x.to(dtype) * w`)."""

    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str) -> None:
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.softcap = args.attn_logit_softcapping
        self.window = args.sliding_window if layer_type == "sliding_attention" else None

        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.rope = make_rope(
            self.head_dim,
            base=args.rope_theta,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, hooks: BlockHooks, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)

        out = attend(
            queries,
            keys,
            values,
            hooks=hooks,
            cache=cache,
            scale=self.scale,
            mask=mask,
            window=self.window,
            softcap=self.softcap,
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """GeGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[args.hidden_activation]

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        gate = hooks.mlp_pre(self.gate_proj(x))
        return self.down_proj(hooks.mlp_post(self.act(gate) * self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer_type = args.layer_types[layer]
        self.self_attn = Attention(args, self.layer_type)
        self.mlp = MLP(args)
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.hooks = BlockHooks(layer, post_norms=True)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        hooks = self.hooks
        x = hooks.resid_pre(x)
        h = hooks.layernorm(self.input_layernorm(x))
        a = hooks.attention_pre_norm(self.self_attn(h, hooks, mask, cache))
        x = hooks.resid_mid(x + hooks.attention(self.post_attention_layernorm(a)))
        m = hooks.mlp_pre_norm(self.mlp(hooks.mlp_in(self.pre_feedforward_layernorm(x)), hooks))
        return hooks.residual(x + hooks.mlp(self.post_feedforward_layernorm(m)))


class Gemma2Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hooks = ModelHooks()

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """`input_embeddings` enter block 0 as given, like transformers' `inputs_embeds` (unscaled)."""
        if input_embeddings is not None:
            h = input_embeddings
        else:
            h = self.embed_tokens(inputs)
            # As transformers: sqrt(hidden_size) rounded to the embedding dtype (bfloat16: sqrt(3072) = 55.43 -> 55.5).
            h = h * mx.array(self.args.hidden_size**0.5, dtype=mx.float32).astype(h.dtype)
        h = self.hooks.embedding(h)
        if cache is None:
            cache = [None] * len(self.layers)

        # Soft-capped attention is explicit and masks by key positions; only the fused path reads masks.
        if self.args.attn_logit_softcapping is None:
            masks = layer_masks(h, cache, self.layers, self.args.sliding_window)
        else:
            masks = [None] * len(self.layers)
        for layer, c, mask in zip(self.layers, cache, masks):
            h = layer(h, mask, cache=c)
        return self.hooks.final_norm(self.norm(h))


class Model(nn.Module, InstrumentedModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        last_only: bool = False,
    ) -> mx.array:
        """`last_only` applies the LM head and the logit soft-cap to the last position alone."""
        out = self.model(inputs, cache, input_embeddings)
        if last_only:
            out = out[:, -1:, :]
        logits = self.unembed(out)
        return softcap(logits, self.args.final_logit_softcapping)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop rotary buffers (rebuilt from the config) and a tied head's stored copy (never a head in use)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        a = self.args
        return sanitize_lm_head(weights, "model.embed_tokens", a.tie_word_embeddings, a.model_type, a.tie_word_embeddings_given)

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
            post_norms=True,
            sliding_window=a.sliding_window,
            layer_types=tuple(a.layer_types),
            block_prefix="model.layers",
        )
