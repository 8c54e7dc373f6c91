"""OLMo 2, as transformers' modeling_olmo2.py computes it.

What sets it apart from Llama:
- no norm before either sublayer: the attention reads the residual stream itself and the MLP the
  stream after the attention add; each sublayer's output is normalised instead
  (`post_attention_layernorm`, `post_feedforward_layernorm`) before it is added;
- q_norm and k_norm are RMSNorms over the whole projected queries / keys (all heads at once, not
  per head), applied before RoPE;
- transformers' Olmo2Config unties the LM head by default (mlx-lm 0.32 ties it when the key is absent).

Hook sites: `attention` and `mlp` are what is added to the residual stream (after the post-norms),
`attention_pre_norm` / `mlp_pre_norm` the sublayer outputs before them. With no pre-norms there is
no `layernorm` component in a block; the MLP's input (`capture_input` on `mlp`) is `resid_mid`
itself, and the attention's, `resid_pre`, is captured as the block input.

Parameter names are those of transformers' checkpoints (4 and 5 alike) and mlx-lm's conversions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask

from ..hooks.architecture import ArchitectureInfo
from ..hooks.components import ComponentType
from ..hooks.names import offered_components
from ..hooks.point import HookPoint
from .attention import attend
from .base import BlockHooks, InstrumentedModel, ModelHooks
from .lm_head import sanitize_lm_head
from .rope import lift_rope_parameters, make_rope

ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}


@dataclass
class ModelArgs(BaseModelArgs):
    """config.json's fields; every default is transformers' Olmo2Config default, for keys a config omits."""

    model_type: str = "olmo2"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    vocab_size: int = 50304
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rope_parameters: Optional[dict[str, Any]] = None
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: Optional[bool] = None

    def __post_init__(self) -> None:
        lift_rope_parameters(self)
        self.tie_word_embeddings_given = self.tie_word_embeddings is not None
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = False
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"OLMo 2 hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}.")


class PostNormBlockHooks(BlockHooks):
    """The sites of a block that normalises sublayer outputs only.

    No `layernorm` site: no norm precedes the attention (names.py offers an attention input only
    through that norm, so `capture_input` on `attention` is refused; the block input is `resid_pre`).
    The MLP reads the stream itself, so its input site (`mlp_in`) is the `resid_mid` HookPoint,
    listed under both names.
    """

    def __init__(self, layer: int) -> None:
        super().__init__(layer, post_norms=True)
        self.layernorm = None  # type: ignore[assignment]
        self.mlp_in = self.resid_mid

    def points(self) -> dict[str, HookPoint]:
        points = super().points()
        points[f"layers.{self.layer}.mlp_in"] = self.resid_mid
        return points


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.n_heads * self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.n_kv_heads * self.head_dim, eps=args.rms_norm_eps)
        self.rope = make_rope(
            self.head_dim,
            base=args.rope_theta,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, hooks: BlockHooks, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x)).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_norm(self.k_proj(x)).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)

        out = attend(queries, keys, values, hooks=hooks, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        gate = hooks.mlp_pre(self.gate_proj(x))
        return self.down_proj(hooks.mlp_post(self.act(gate) * self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_feedforward_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hooks = PostNormBlockHooks(layer)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        hooks = self.hooks
        x = hooks.resid_pre(x)
        a = hooks.attention_pre_norm(self.self_attn(x, hooks, mask, cache))
        x = hooks.resid_mid(x + hooks.attention(self.post_attention_layernorm(a)))
        m = hooks.mlp_pre_norm(self.mlp(x, hooks))
        return hooks.residual(x + hooks.mlp(self.post_feedforward_layernorm(m)))


class Olmo2Model(nn.Module):
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
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return self.hooks.final_norm(self.norm(h))


class Model(nn.Module, InstrumentedModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Olmo2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        last_only: bool = False,
    ) -> mx.array:
        """`last_only` applies the LM head to the last position alone (a prompt pass reads no other)."""
        out = self.model(inputs, cache, input_embeddings)
        if last_only:
            out = out[:, -1:, :]
        return self.unembed(out)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop rotary buffers (rebuilt from the config) and, only where the head is tied, its stored copy."""
        weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
        a = self.args
        return sanitize_lm_head(weights, "model.embed_tokens", a.tie_word_embeddings, a.model_type, a.tie_word_embeddings_given)

    @property
    def layer_types(self) -> tuple[str, ...]:
        return ("full_attention",) * self.args.num_hidden_layers

    @property
    def sliding_window(self) -> Optional[int]:
        return None

    @property
    def arch_info(self) -> ArchitectureInfo:
        a = self.args
        info = ArchitectureInfo(
            model_type=a.model_type,
            num_layers=a.num_hidden_layers,
            d_model=a.hidden_size,
            n_heads=a.num_attention_heads,
            n_kv_heads=a.num_key_value_heads,
            head_dim=a.head_dim,
            vocab_size=a.vocab_size,
            d_mlp=a.intermediate_size,
            post_norms=True,
            layer_types=self.layer_types,
            block_prefix="model.layers",
        )
        # Everything a native post-norm block offers but `layernorm`: no norm precedes the attention.
        offered = [c.value for c in offered_components(info, native=True) if c is not ComponentType.LAYERNORM]
        return replace(info, offered=tuple(offered))
