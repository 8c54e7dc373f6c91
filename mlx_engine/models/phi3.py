"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share `model_type: phi3`), as transformers' modeling_phi3.py computes it.

What sets it apart from Llama:
- fused projections: `qkv_proj` (queries, keys, values stacked on the output axis) and
  `gate_up_proj` (gate half first, then up: `gate, up = chunk(2)`); the checkpoints, Hub,
  transformers 4 and 5 and mlx-lm's conversions all store them fused, so they stay fused here and
  the hook sites see the split halves;
- partial rotary: RoPE turns only the first `partial_rotary_factor * head_dim` features of each head.
  transformers 5 may write the factor only inside `rope_parameters`, which mlx-lm 0.32 never reads;
- LongRoPE (`longrope`, formerly `su`): per-frequency `short_factor` up to
  `original_max_position_embeddings` tokens and `long_factor` beyond, and cos/sin scaled by an
  attention factor. mlx-lm 0.32's SuScaledRoPE always uses the long factors (and ignores `factor`
  and `attention_factor`); transformers picks them per forward by the sequence length so far, and
  so does this file. A cached pass that crosses the threshold therefore sees earlier positions
  computed with the short factors, as transformers' forward with a cache does; transformers'
  `generate` instead recomputes the whole sequence at that step, which no model file can (it has
  no token history), so after such a crossing logits follow the cached forward, not the recompute;
- an optional sliding window on every layer (`sliding_window`), through a rotating cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask

from ..hooks.architecture import ArchitectureInfo
from .attention import attend
from .base import BlockHooks, InstrumentedModel, ModelHooks
from .lm_head import sanitize_lm_head
from .rope import lift_rope_parameters

ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
}
# transformers 5's Phi3Config rewrites these older names of LongRoPE to "longrope".
LONGROPE_ALIASES = ("longrope", "su", "yarn")


@dataclass
class ModelArgs(BaseModelArgs):
    """config.json's fields; every default is transformers' Phi3Config default, for keys a config omits."""

    model_type: str = "phi3"
    hidden_size: int = 3072
    num_hidden_layers: int = 32
    intermediate_size: int = 8192
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    vocab_size: int = 32064
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    # transformers prefers this top-level value over one inside the RoPE parameters.
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    rope_parameters: Optional[dict[str, Any]] = None
    # transformers 4's place for the factor; transformers 5 moves it into rope_parameters.
    partial_rotary_factor: Optional[float] = None
    tie_word_embeddings: Optional[bool] = None
    sliding_window: Optional[int] = None

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
            raise ValueError(f"Phi-3 hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}.")
        # transformers 4 passed rope_scaling, 5 writes rope_parameters; the loader lifts the latter into
        # the former except for plain RoPE, where only rope_parameters keeps partial_rotary_factor.
        params = dict(self.rope_scaling or self.rope_parameters or {})
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type in LONGROPE_ALIASES:
            rope_type = "longrope"
        if rope_type not in ("default", "longrope"):
            raise ValueError(f"Phi-3 RoPE type must be 'default' or 'longrope' (as in transformers), got {rope_type!r}.")
        top_level = self.partial_rotary_factor if self.partial_rotary_factor is not None else 1.0
        self.partial_rotary_factor = float(params.get("partial_rotary_factor", top_level))
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        self.rope_type = rope_type
        self.longrope = params if rope_type == "longrope" else None
        if self.longrope is not None:
            for key in ("short_factor", "long_factor"):
                if len(self.longrope.get(key) or ()) != self.rotary_dim // 2:
                    raise ValueError(f"Phi-3 LongRoPE {key} must list {self.rotary_dim // 2} factors (one per rotated pair).")
        self.layer_types = ["sliding_attention" if self.sliding_window else "full_attention"] * self.num_hidden_layers


class Phi3RoPE(nn.Module):
    """RoPE on the first `rotary_dim` features (rotate-half pairs), plain or LongRoPE, as transformers computes it.

    LongRoPE divides each inverse frequency by its short or long factor, chosen by whether the sequence
    (positions seen plus this pass) exceeds `original_max_position_embeddings`, and scales the rotated
    features by the attention factor (transformers scales cos and sin).
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.dims = args.rotary_dim
        base_periods = args.rope_theta ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims)
        lr = args.longrope
        if lr is None:
            self.threshold: Optional[int] = None
            self.attention_factor = 1.0
            self._short = self._long = base_periods
            return
        self.threshold = args.original_max_position_embeddings
        # mx.fast.rope takes periods (1 / inverse frequency): factor * base ** (2i / dims).
        self._short = mx.array(lr["short_factor"], dtype=mx.float32) * base_periods
        self._long = mx.array(lr["long_factor"], dtype=mx.float32) * base_periods
        factor = lr.get("factor")
        if factor is None:
            factor = args.max_position_embeddings / self.threshold
        attention_factor = lr.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.threshold))
        self.attention_factor = float(attention_factor)

    def is_long(self, length: int) -> bool:
        """Whether a sequence of `length` tokens uses the long factors."""
        return self.threshold is not None and length > self.threshold

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        periods = self._long if self.is_long(offset + x.shape[2]) else self._short
        if self.attention_factor != 1.0:
            x = x.at[..., : self.dims].multiply(self.attention_factor)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=periods)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str) -> None:
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.window = args.sliding_window if layer_type == "sliding_attention" else None
        op_size = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(dim, op_size, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.rope = Phi3RoPE(args)

    def __call__(self, x: mx.array, hooks: BlockHooks, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        q_end = self.n_heads * self.head_dim
        k_end = q_end + self.n_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        queries = qkv[..., :q_end].reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = qkv[..., q_end:k_end].reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = qkv[..., k_end:].reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)

        out = attend(queries, keys, values, hooks=hooks, cache=cache, scale=self.scale, mask=mask, window=self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """down(act(gate) * up), gate and up the two halves of one fused projection."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        gate = hooks.mlp_pre(gate)
        return self.down_proj(hooks.mlp_post(self.act(gate) * up))


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


class Phi3Model(nn.Module):
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
        # Every layer attends alike (all windowed or none), so one mask serves them all.
        mask = create_attention_mask(h, cache[0], window_size=self.args.sliding_window)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return self.hooks.final_norm(self.norm(h))


class Model(nn.Module, InstrumentedModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Phi3Model(args)
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
        """Every layout in use names the fused tensors alike; drop rotary buffers and a tied head's copy."""
        weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
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
