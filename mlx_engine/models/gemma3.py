"""Gemma 3 text (`gemma3_text`, transformers' Gemma3ForCausalLM): Gemma 2's sandwich norms with
RMS-normalised queries and keys, local (sliding) and global layers with a RoPE each, no
attention soft-capping.

- Every norm scales by `1 + weight`, in float32 as transformers computes it.
- The embedding is scaled by sqrt(hidden_size) rounded to the activation dtype; queries by
  `query_pre_attn_scalar ** -0.5`, not head_dim.
- Layer kinds come from `layer_types`, else from `sliding_window_pattern` (default 6) the way
  transformers derives them: a config with fewer layers than the pattern has no global layer.
- RoPE per layer kind: transformers 5 writes `rope_parameters` keyed by kind; transformers 4
  wrote `rope_theta` (global), `rope_local_base_freq` and `rope_scaling` (global layers only).
- `attn_logit_softcapping` is read but, as in transformers' Gemma 3, never applied.

Parameter names are those of transformers' and mlx-lm's checkpoints (`model.layers.{i}...`).
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
from .rope import make_rope

ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu": nn.gelu,
}
LAYER_KINDS = ("full_attention", "sliding_attention")
# transformers' Gemma3TextConfig.default_theta: global layers 1e6, local layers 1e4.
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# RoPE types whose pretraining length transformers fills from max_position_embeddings when absent.
NEEDS_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")
# Checkpoint prefixes of the text model inside multimodal Gemma 3 layouts (transformers 4 and
# mlx-lm's wrapper: `language_model.model.`; transformers 5: `model.language_model.`).
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."), ("language_model.lm_head.", "lm_head."))
NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


@dataclass
class ModelArgs(BaseModelArgs):
    """config.json of `gemma3_text`; every default is transformers' Gemma3TextConfig default."""

    model_type: str = "gemma3_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    vocab_size: int = 262208
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    query_pre_attn_scalar: float = 256
    attention_bias: bool = False
    sliding_window: Optional[int] = 4096
    sliding_window_pattern: Optional[int] = None
    layer_types: Optional[list[str]] = None
    # transformers 5: {"full_attention": {...}, "sliding_attention": {...}}.
    rope_parameters: Optional[dict[str, Any]] = None
    # transformers 4: global theta, local theta, and the global layers' scaling.
    rope_theta: Optional[float] = None
    rope_local_base_freq: Optional[float] = None
    rope_scaling: Optional[dict[str, Any]] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    tie_word_embeddings: Optional[bool] = None
    use_bidirectional_attention: Optional[bool] = False

    def __post_init__(self) -> None:
        # Whether config.json said so, for a load error that names the default it fell back on.
        self.tie_word_embeddings_given = self.tie_word_embeddings is not None
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = True
        if self.use_bidirectional_attention:
            raise ValueError("Gemma 3 with use_bidirectional_attention is an encoder, not a causal LM; it is not supported.")
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not one of {sorted(ACTIVATIONS)}.")
        if self.layer_types is None:
            pattern = self.sliding_window_pattern or 6
            self.layer_types = [
                "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        unknown = set(self.layer_types) - set(LAYER_KINDS)
        if unknown or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must name {self.num_hidden_layers} layers from {LAYER_KINDS}; got {self.layer_types}.")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window.")
        self.rope_parameters = self._rope_per_kind()

    def _rope_per_kind(self) -> dict[str, dict[str, Any]]:
        """Each layer kind's RoPE, resolved as Gemma3TextConfig.convert_rope_params_to_dict does."""
        given = self.rope_parameters or {}
        params = {kind: dict(given[kind]) for kind in LAYER_KINDS if isinstance(given.get(kind), dict)}
        rope_theta, rope_scaling = self.rope_theta, self.rope_scaling
        if "rope_theta" in given and rope_theta == given["rope_theta"]:
            # Top-level keys the loader lifted from a flat `rope_parameters`, which Gemma 3 ignores.
            rope_theta, rope_scaling = None, None
        full = params.setdefault("full_attention", {"rope_type": "default"})
        if rope_scaling:
            full.update(rope_scaling)
        old_theta = {"full_attention": rope_theta, "sliding_attention": self.rope_local_base_freq}
        for kind in LAYER_KINDS:
            p = params.setdefault(kind, {"rope_type": "default"})
            if p.get("rope_theta") is None:
                p["rope_theta"] = old_theta[kind] if old_theta[kind] is not None else DEFAULT_THETA[kind]
            # As transformers: an explicit rope_type wins over the old `type` key, so old scaling
            # that names only `type` leaves the global layers' default rope_type in place.
            p.setdefault("rope_type", p.get("type", "default"))
            if p["rope_type"] in NEEDS_ORIGINAL_LENGTH:
                p.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return params

    def rope_of(self, layer_type: str) -> tuple[float, Optional[dict[str, Any]]]:
        """(base, scaling or None) of a layer kind's RoPE."""
        p = self.rope_parameters[layer_type]
        scaling = None if p["rope_type"] == "default" else {k: v for k, v in p.items() if k != "rope_theta"}
        return float(p["rope_theta"]), scaling


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight), computed in float32 and cast back, as transformers does."""

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
        self.window = args.sliding_window if layer_type == "sliding_attention" else None
        bias = args.attention_bias

        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        base, scaling = args.rope_of(layer_type)
        self.rope = make_rope(self.head_dim, base=base, scaling=scaling, max_position_embeddings=args.max_position_embeddings)

    def __call__(self, x: mx.array, hooks: BlockHooks, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(self.q_norm(queries), offset=offset)
        keys = self.rope(self.k_norm(keys), offset=offset)

        out = attend(queries, keys, values, hooks=hooks, cache=cache, scale=self.scale, mask=mask, window=self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """GeGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
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
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hooks = BlockHooks(layer, post_norms=True)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        hooks = self.hooks
        x = hooks.resid_pre(x)
        h = hooks.layernorm(self.input_layernorm(x))
        a = hooks.attention_pre_norm(self.self_attn(h, hooks, mask, cache))
        x = hooks.resid_mid(x + hooks.attention(self.post_attention_layernorm(a)))
        m = hooks.mlp_pre_norm(self.mlp(hooks.mlp_in(self.pre_feedforward_layernorm(x)), hooks))
        return hooks.residual(x + hooks.mlp(self.post_feedforward_layernorm(m)))


class Gemma3Model(nn.Module):
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
        """`input_embeddings`, as transformers' `inputs_embeds`, enter block 0 as given (already scaled)."""
        if input_embeddings is not None:
            h = input_embeddings
        else:
            h = self.embed_tokens(inputs)
            # transformers casts sqrt(hidden_size) to the weights' dtype first (bfloat16: 55.4256 -> 55.5).
            h = h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)
        h = self.hooks.embedding(h)
        if cache is None:
            cache = [None] * len(self.layers)

        for layer, c, mask in zip(self.layers, cache, layer_masks(h, cache, self.layers, self.args.sliding_window)):
            h = layer(h, mask, c)
        return self.hooks.final_norm(self.norm(h))


class Model(nn.Module, InstrumentedModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        last_only: bool = False,
    ) -> mx.array:
        """`last_only` applies the LM head (and the final soft-cap) to the last position alone."""
        out = self.model(inputs, cache, input_embeddings)
        if last_only:
            out = out[:, -1:, :]
        logits = self.unembed(out)
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Text-model keys under `model.` and `lm_head.`, whichever layout they came in.

        A text config may point at a multimodal checkpoint's weights: its language model is
        renamed to the text layout and its vision tower, unused here, is left out. Rotary
        buffers are rebuilt from the config; the head is kept or refused as transformers would.
        """
        sanitized = {}
        for key, value in weights.items():
            if "rotary_emb" in key or key.startswith(NON_TEXT_PREFIXES):
                continue
            for old, new in TEXT_PREFIXES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            sanitized[key] = value
        a = self.args
        return sanitize_lm_head(sanitized, "model.embed_tokens", a.tie_word_embeddings, a.model_type, a.tie_word_embeddings_given)

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
