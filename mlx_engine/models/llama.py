"""Llama, Mistral and Qwen2: one decoder the config turns into each.

- Llama: optional bias on every attention projection (`attention_bias`) and the MLP (`mlp_bias`).
- Qwen2: bias on q/k/v only, never on o_proj (as transformers builds it, whatever the config says);
  sliding windows only when `use_sliding_window` is set, on layers from `max_window_layers` on.
- Mistral: every layer attends over the last `sliding_window` positions, through a rotating cache.

Parameter names are those of transformers' and mlx-lm's checkpoints (`model.layers.{i}...`),
so both load without renaming, quantized mlx-lm checkpoints included.
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
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_pytorch_tanh": nn.gelu_approx,
}

# transformers' default when config.json omits `tie_word_embeddings` (LlamaConfig, MistralConfig and
# Qwen2Config in transformers 5): the LM head is its own tensor unless the config says otherwise.
TIE_WORD_EMBEDDINGS_DEFAULT = {"llama": False, "mistral": False, "qwen2": False}


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_theta: Optional[float] = None
    rope_traditional: bool = False
    rope_scaling: Optional[dict[str, Any]] = None
    rope_parameters: Optional[dict[str, Any]] = None
    tie_word_embeddings: Optional[bool] = None
    layer_types: Optional[list[str]] = None
    sliding_window: Optional[int] = None
    # Qwen2: a window only where asked for, on layers max_window_layers and up.
    use_sliding_window: Optional[bool] = None
    max_window_layers: Optional[int] = None

    def __post_init__(self) -> None:
        lift_rope_parameters(self)
        # Whether config.json said so, for a load error that names the default it fell back on.
        self.tie_word_embeddings_given = self.tie_word_embeddings is not None
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = TIE_WORD_EMBEDDINGS_DEFAULT.get(self.model_type, False)
        if self.rope_theta is None:
            self.rope_theta = 1000000.0 if self.model_type == "qwen2" else 10000.0
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.layer_types = list(self._resolve_layer_types())

    def _resolve_layer_types(self) -> list[str]:
        n = self.num_hidden_layers
        if self.model_type == "qwen2":
            if not self.use_sliding_window:
                self.sliding_window = None
            if self.sliding_window is not None and self.layer_types is None:
                first = self.max_window_layers if self.max_window_layers is not None else 28
                return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        elif self.model_type == "mistral" and self.sliding_window is not None:
            # transformers' Mistral windows every layer and ignores layer_types.
            return ["sliding_attention"] * n
        if self.sliding_window is None or self.layer_types is None:
            return ["full_attention"] * n
        return self.layer_types

    @property
    def qkv_bias(self) -> bool:
        return True if self.model_type == "qwen2" else self.attention_bias

    @property
    def o_bias(self) -> bool:
        return False if self.model_type == "qwen2" else self.attention_bias


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str) -> None:
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.window = args.sliding_window if layer_type == "sliding_attention" else None

        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=args.o_bias)
        self.rope = make_rope(
            self.head_dim,
            base=args.rope_theta,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
            traditional=args.rope_traditional,
        )

    def __call__(
        self,
        x: mx.array,
        hooks: BlockHooks,
        mask: Any = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)

        out = attend(
            queries, keys, values, hooks=hooks, cache=cache, scale=self.scale, mask=mask, window=self.window
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.up_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.down_proj = nn.Linear(hidden, dim, bias=args.mlp_bias)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        gate = hooks.mlp_pre(self.gate_proj(x))
        return self.down_proj(hooks.mlp_post(self.act(gate) * self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer_type = args.layer_types[layer]
        self.self_attn = Attention(args, self.layer_type)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hooks = BlockHooks(layer)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        hooks = self.hooks
        x = hooks.resid_pre(x)
        h = hooks.layernorm(self.input_layernorm(x))
        x = hooks.resid_mid(x + hooks.attention(self.self_attn(h, hooks, mask, cache)))
        m = hooks.mlp(self.mlp(hooks.mlp_in(self.post_attention_layernorm(x)), hooks))
        return hooks.residual(x + m)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hooks = ModelHooks()

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        h = self.hooks.embedding(h)
        if cache is None:
            cache = [None] * len(self.layers)

        for layer, c, mask in zip(self.layers, cache, layer_masks(h, cache, self.layers, self.args.sliding_window)):
            h = layer(h, mask, cache=c)
        return self.hooks.final_norm(self.norm(h))


class Model(nn.Module, InstrumentedModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
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
        if last_only:
            out = out[:, -1:, :]
        return self.unembed(out)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # Precomputed rotary frequencies are rebuilt from the config.
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
            sliding_window=a.sliding_window,
            layer_types=tuple(a.layer_types),
            block_prefix="model.layers",
        )
