"""GPT-2: learned absolute positions, LayerNorm with bias, GELU MLP, tied LM head.

Parameters follow mlx-lm's layout (`model.wte`, `model.h.{i}`, Linear weights as
[out, in]), so checkpoints mlx-lm writes, quantized ones included, load unchanged.
transformers' checkpoints (`transformer.h.{i}` or bare `h.{i}`) store Conv1D weights
as [in, out]; `sanitize` transposes them and drops the causal-mask buffers.

The `embedding` hook captures `wte(tokens) + wpe(positions)`: the sum that enters
block 0, which is transformers' `hidden_states[0]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask

from ..hooks.architecture import ArchitectureInfo
from .attention import attend
from .base import BlockHooks, InstrumentedModel, ModelHooks
from .lm_head import sanitize_lm_head

# transformers' "gelu_fast" is the tanh form (FastGELUActivation), not MLX's sigmoid gelu_fast_approx.
ACTIVATIONS = {
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}

# transformers' Conv1D modules, whose weights are stored transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    n_embd: int
    n_head: int
    n_layer: int
    vocab_size: int
    n_positions: Optional[int] = None
    n_ctx: Optional[int] = None
    n_inner: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: Optional[bool] = None

    def __post_init__(self) -> None:
        # transformers' GPT2Config ties by default; remember whether config.json said so, for load errors.
        self.tie_word_embeddings_given = self.tie_word_embeddings is not None
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = True
        # transformers 5 writes only n_positions; older configs carry n_ctx as well.
        if self.n_positions is None:
            self.n_positions = self.n_ctx
        if self.n_positions is None:
            raise ValueError("GPT-2 config needs n_positions (or n_ctx)")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.n_head = args.n_head
        self.head_dim = args.n_embd // args.n_head
        scale = self.head_dim**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        self.scale = scale
        self.c_attn = nn.Linear(args.n_embd, 3 * args.n_embd, bias=True)
        self.c_proj = nn.Linear(args.n_embd, args.n_embd, bias=True)

    def __call__(
        self,
        x: mx.array,
        hooks: BlockHooks,
        mask: Any = None,
        cache: Optional[Any] = None,
    ) -> mx.array:
        B, L, _ = x.shape
        queries, keys, values = mx.split(self.c_attn(x), 3, axis=-1)
        queries = queries.reshape(B, L, self.n_head, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_head, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_head, -1).transpose(0, 2, 1, 3)
        out = attend(queries, keys, values, hooks=hooks, cache=cache, scale=self.scale, mask=mask)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.c_fc = nn.Linear(args.n_embd, args.n_inner)
        self.c_proj = nn.Linear(args.n_inner, args.n_embd)
        self.act = ACTIVATIONS[args.activation_function]

    def __call__(self, x: mx.array, hooks: BlockHooks) -> mx.array:
        return self.c_proj(hooks.mlp_post(self.act(hooks.mlp_pre(self.c_fc(x)))))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args, layer)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)
        self.hooks = BlockHooks(layer)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[Any] = None) -> mx.array:
        hooks = self.hooks
        x = hooks.resid_pre(x)
        h = hooks.layernorm(self.ln_1(x))
        x = hooks.resid_mid(x + hooks.attention(self.attn(h, hooks, mask, cache)))
        m = hooks.mlp(self.mlp(hooks.mlp_in(self.ln_2(x)), hooks))
        return hooks.residual(x + m)


class GPT2Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = [TransformerBlock(args, i) for i in range(args.n_layer)]
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.hooks = ModelHooks()

    def __call__(self, inputs: mx.array, cache: Optional[list[Any]] = None) -> mx.array:
        L = inputs.shape[1]
        if cache is None:
            cache = [None] * len(self.h)
        offset = cache[0].offset if cache[0] is not None else 0
        h = self.hooks.embedding(self.wte(inputs) + self.wpe(mx.arange(offset, offset + L)))
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.h, cache):
            h = layer(h, mask, cache=c)
        return self.hooks.final_norm(self.ln_f(h))


class Model(nn.Module, InstrumentedModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = GPT2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[list[Any]] = None, last_only: bool = False) -> mx.array:
        """`last_only` applies the LM head to the last position alone: a prompt pass keeps only
        that position's logits, and the head is a large share of a small model's work."""
        out = self.model(inputs, cache)
        if last_only:
            out = out[:, -1:, :]
        if self.args.tie_word_embeddings:
            return self.model.wte.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # mlx-lm's layout already has the "model." prefix and Linear weights.
        mlx_layout = any(k.startswith("model.") for k in weights)
        out = {}
        for key, value in weights.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not mlx_layout and not key.startswith("lm_head."):
                key = "model." + key.removeprefix("transformer.")
                if key.endswith(CONV1D_WEIGHTS):
                    value = value.T
            out[key] = value
        a = self.args
        return sanitize_lm_head(out, "model.wte", a.tie_word_embeddings, a.model_type, a.tie_word_embeddings_given)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.h

    @property
    def layer_types(self) -> tuple[str, ...]:
        return ("full_attention",) * self.args.n_layer

    @property
    def sliding_window(self) -> Optional[int]:
        return None

    @property
    def arch_info(self) -> ArchitectureInfo:
        a = self.args
        return ArchitectureInfo(
            model_type=a.model_type,
            num_layers=a.n_layer,
            d_model=a.n_embd,
            n_heads=a.n_head,
            n_kv_heads=a.n_head,
            head_dim=a.n_embd // a.n_head,
            vocab_size=a.vocab_size,
            d_mlp=a.n_inner,
            layer_types=("full_attention",) * a.n_layer,
            block_prefix="transformer.h",
        )
