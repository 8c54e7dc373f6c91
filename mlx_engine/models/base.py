"""What every native architecture shares: the capture sites of a block, and the model-level
plumbing (hook points, caches) that would otherwise be repeated per architecture.

Hook tensors keep the batch axis (batch is always 1 here); the hook session drops it.
Shapes handed to hook points:
  [B, T, d_model]       embedding, resid_pre, layernorm, attention, resid_mid, mlp_in, mlp, residual, final_norm
  [B, T, d_mlp]         mlp_pre, mlp_post (a dense MLP's hidden units)
  [B, T, k, d_expert]   expert_pre, expert_post (the k routed experts' hidden units; context: experts [B, T, k])
  [B, H, T, head_dim]   query (H = n_heads), key and value (H = n_kv_heads), z (H = n_heads)
  [B, H, T, S]          attention_scores, attention_pattern (context: key_positions [S])
  [B, T, n_experts]     router logits (context: experts [B, T, k], weights [B, T, k])
See docs/architecture.md for what each component means.
"""

from __future__ import annotations

from typing import Any, Optional

from mlx_lm.models.cache import KVCache, RotatingKVCache

from ..hooks.point import HookPoint


class BlockHooks:
    """The HookPoints of block `layer` (`layers.{layer}.{site}`), in forward order.

    `resid_pre` is the block input (residual and layernorm inputs), `resid_mid` the residual
    stream after the attention add, `mlp_in` the output of the post-attention norm. A dense
    block has `mlp_pre`/`mlp_post` (its neurons); a mixture-of-experts block has `router`
    and `expert_pre`/`expert_post` instead.
    """

    def __init__(self, layer: int, moe: bool = False, post_norms: bool = False) -> None:
        self.layer = layer
        name = f"layers.{layer}"
        self.resid_pre = HookPoint(f"{name}.resid_pre")
        self.layernorm = HookPoint(f"{name}.layernorm")
        self.query = HookPoint(f"{name}.query")
        self.key = HookPoint(f"{name}.key")
        self.value = HookPoint(f"{name}.value")
        self.attention_scores = HookPoint(f"{name}.attention_scores")
        self.attention_pattern = HookPoint(f"{name}.attention_pattern")
        self.z = HookPoint(f"{name}.z")
        # Sandwich-norm blocks: the sublayer outputs before their post-norms (`attention`/`mlp` are after).
        self.attention_pre_norm: Optional[HookPoint] = HookPoint(f"{name}.attention_pre_norm") if post_norms else None
        self.mlp_pre_norm: Optional[HookPoint] = HookPoint(f"{name}.mlp_pre_norm") if post_norms else None
        self.attention = HookPoint(f"{name}.attention")
        self.resid_mid = HookPoint(f"{name}.resid_mid")
        self.mlp_in = HookPoint(f"{name}.mlp_in")
        self.mlp_pre: Optional[HookPoint] = None if moe else HookPoint(f"{name}.mlp_pre")
        self.mlp_post: Optional[HookPoint] = None if moe else HookPoint(f"{name}.mlp_post")
        self.router: Optional[HookPoint] = HookPoint(f"{name}.router") if moe else None
        self.expert_pre: Optional[HookPoint] = HookPoint(f"{name}.expert_pre") if moe else None
        self.expert_post: Optional[HookPoint] = HookPoint(f"{name}.expert_post") if moe else None
        self.mlp = HookPoint(f"{name}.mlp")
        self.residual = HookPoint(f"{name}.residual")

    def points(self) -> dict[str, HookPoint]:
        points = [
            self.resid_pre, self.layernorm, self.query, self.key, self.value, self.attention_scores,
            self.attention_pattern, self.z, self.attention_pre_norm, self.attention, self.resid_mid, self.mlp_in,
            self.mlp_pre, self.mlp_post, self.router, self.expert_pre, self.expert_post, self.mlp_pre_norm, self.mlp,
            self.residual,
        ]
        return {p.name: p for p in points if p is not None}

    @property
    def wants_explicit_attention(self) -> bool:
        return self.attention_scores.fn is not None or self.attention_pattern.fn is not None


class ModelHooks:
    """The model-level capture sites: the embedding (what enters block 0) and the final norm's output."""

    def __init__(self) -> None:
        self.embedding = HookPoint("embedding")
        self.final_norm = HookPoint("final_norm")


def make_caches(layer_types: tuple[str, ...], sliding_window: Optional[int]) -> list[Any]:
    """The standard cache per full-attention layer, a rotating one per sliding-window layer."""
    return [
        RotatingKVCache(max_size=sliding_window) if lt == "sliding_attention" else KVCache()
        for lt in layer_types
    ]


class InstrumentedModel:
    """Mixed into each architecture's `Model`: its hook points, caches and LM head.

    The defaults fit the mlx-lm layout every architecture here uses (`self.model` holding
    `layers`, `hooks`, `embed_tokens`; `self.args` holding `layer_types`, `sliding_window`,
    `tie_word_embeddings`); a Model whose layout differs (GPT-2) overrides what differs.
    """

    args: Any
    model: Any

    @property
    def layers(self) -> list[Any]:
        return self.model.layers

    @property
    def model_hooks(self) -> ModelHooks:
        return self.model.hooks

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(self.args.layer_types)

    @property
    def sliding_window(self) -> Optional[int]:
        return self.args.sliding_window

    def unembed(self, hidden: Any) -> Any:
        """Logits from final-norm outputs: the tied embedding, or the model's own `lm_head`."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)  # type: ignore[attr-defined]

    def make_cache(self) -> list[Any]:
        return make_caches(tuple(self.layer_types), self.sliding_window)

    def hook_points(self) -> dict[str, HookPoint]:
        points = {"embedding": self.model_hooks.embedding}
        for layer in self.layers:
            points.update(layer.hooks.points())
        points["final_norm"] = self.model_hooks.final_norm
        return points
