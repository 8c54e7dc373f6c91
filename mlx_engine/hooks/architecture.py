"""The facts about a loaded model that hook resolution, shapes, budgets and listings read.

Every native architecture builds one `ArchitectureInfo` from its config; the fallback
wrapper builds one from the config keys mlx-lm models share. It is plain data, fixed at
load time, so request threads may read it without touching MLX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class ArchitectureInfo:
    """Dimensions and layout the hook system reports and validates against."""

    model_type: str
    num_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    n_experts: Optional[int] = None
    experts_per_token: Optional[int] = None
    # MLP hidden units (neurons) per position: d_mlp of a dense MLP, d_expert of each MoE expert.
    d_mlp: Optional[int] = None
    # Sandwich norms (Gemma, OLMo 2): each sublayer's output is normalised before the residual add.
    post_norms: bool = False
    sliding_window: Optional[int] = None
    # Per layer: "full_attention" or "sliding_attention".
    layer_types: tuple[str, ...] = field(default_factory=tuple)
    # Canonical module path prefix of the blocks in the checkpoint ("model.layers", "transformer.h").
    block_prefix: str = "model.layers"
    # Components the model's code can capture; None means all that the architecture has.
    offered: Optional[tuple[str, ...]] = None
    # Whether the final norm has a hook point (an mlx-lm model whose final norm was not found has none).
    final_norm: bool = True

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "full_attention"

    def window_of(self, layer: Optional[int]) -> Optional[int]:
        """The sliding window of `layer`'s attention, None for full attention."""
        if layer is None or self.layer_type(layer) != "sliding_attention":
            return None
        return self.sliding_window
