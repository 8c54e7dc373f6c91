"""Qwen 3 (dense): Llama's decoder with an RMSNorm over each head's queries and keys before RoPE.

As transformers builds it (the reference): `head_dim` comes from the config (128 when absent,
whatever hidden_size / heads is), no attention bias unless `attention_bias`, an untied LM
head unless `tie_word_embeddings` says otherwise, and sliding windows only when
`use_sliding_window` is set: on the layers `layer_types` marks, or from `max_window_layers` up.
mlx-lm's qwen3.py ignores the window.

Parameter names are those of transformers' and mlx-lm's checkpoints (`model.layers.{i}...`),
so both load without renaming, quantized mlx-lm checkpoints included. `qwen3_moe.py` builds
its blocks from the attention and MLP here.
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
from .llama import ACTIVATIONS
from .lm_head import sanitize_lm_head
from .rope import lift_rope_parameters, make_rope


@dataclass
class ModelArgs(BaseModelArgs):
    """Qwen3Config's fields, with transformers' defaults where a config.json leaves one out."""

    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 32
    head_dim: Optional[int] = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    # None: absent from config.json, so transformers' default for the class (False: an untied head).
    tie_word_embeddings: Optional[bool] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    # transformers 5 writes rope_theta and the scaling here; it wins over the old keys.
    rope_parameters: Optional[dict[str, Any]] = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 4096
    max_window_layers: int = 28
    layer_types: Optional[list[str]] = None

    def __post_init__(self) -> None:
        lift_rope_parameters(self)
        resolve_tie(self)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.layer_types = self._resolve_layer_types()

    def _resolve_layer_types(self) -> list[str]:
        """Qwen3Config's rule: the window exists only with use_sliding_window; without
        explicit layer_types it covers the layers from max_window_layers on."""
        n = self.num_hidden_layers
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.sliding_window is None:
            # Without a window a "sliding" layer has nothing to slide (transformers cannot build a cache for it).
            return ["full_attention"] * n
        if self.layer_types is None:
            return ["sliding_attention" if i >= self.max_window_layers else "full_attention" for i in range(n)]
        return list(self.layer_types)


def resolve_tie(args: Any) -> None:
    """Qwen3Config's and Qwen3MoeConfig's default when config.json omits tie_word_embeddings: untied."""
    # Whether config.json said so, for a load error that names the default it fell back on.
    args.tie_word_embeddings_given = args.tie_word_embeddings is not None
    if args.tie_word_embeddings is None:
        args.tie_word_embeddings = False


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorms (Qwen 3, dense and MoE alike).

    `args` needs hidden_size, num_attention_heads, num_key_value_heads, head_dim,
    attention_bias, rms_norm_eps, the RoPE fields and sliding_window.
    """

    def __init__(self, args: Any, layer_type: str) -> None:
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.window = args.sliding_window if layer_type == "sliding_attention" else None

        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        # Over head_dim only: each head's query and key is normalised on its own.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = make_rope(
            self.head_dim,
            base=args.rope_theta,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, hooks: BlockHooks, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)

        out = attend(queries, keys, values, hooks=hooks, cache=cache, scale=self.scale, mask=mask, window=self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """The gated MLP without biases: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, hidden_act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[hidden_act]

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        gate = hooks.mlp_pre(self.gate_proj(x))
        return self.down_proj(hooks.mlp_post(self.act(gate) * self.up_proj(x)))


class TransformerBlock(nn.Module):
    """Pre-norm attention and MLP. `mlp` replaces the dense MLP (qwen3_moe.py's experts, whose
    block then has the router and expert sites instead of mlp_pre/mlp_post)."""

    def __init__(self, args: Any, layer: int, mlp: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.layer_type = args.layer_types[layer]
        self.sparse = mlp is not None
        self.self_attn = Attention(args, self.layer_type)
        self.mlp = mlp if mlp is not None else MLP(args.hidden_size, args.intermediate_size, args.hidden_act)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hooks = BlockHooks(layer, moe=self.sparse)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        hooks = self.hooks
        x = hooks.resid_pre(x)
        h = hooks.layernorm(self.input_layernorm(x))
        x = hooks.resid_mid(x + hooks.attention(self.self_attn(h, hooks, mask, cache)))
        m = hooks.mlp(self.mlp(hooks.mlp_in(self.post_attention_layernorm(x)), hooks))
        return hooks.residual(x + m)


class Qwen3Model(nn.Module):
    """Embedding, blocks of type `block` (dense here, mixed dense/MoE in qwen3_moe.py), final norm."""

    def __init__(self, args: Any, block: type) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [block(args, i) for i in range(args.num_hidden_layers)]
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
            h = layer(h, mask, c)
        return self.hooks.final_norm(self.norm(h))


class Model(nn.Module, InstrumentedModel):
    block: type = TransformerBlock

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3Model(args, self.block)
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
        """Drop the rotary frequencies (rebuilt from the config) and a tied head's copy of the embedding;
        a stored head transformers would use, or a missing one it needs, is a load error."""
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
