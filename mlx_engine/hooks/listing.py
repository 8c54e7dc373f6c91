"""A model's hook points as a JSON-ready listing: layers, components, shapes, aliases.

`ModelKit.hook_points` holds the live HookPoint objects; this is what clients read
(`GET /v1/models/{id}/hook_points`, `mlx-engine hook-points`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .components import NEURON_MEANING, ComponentType, row_shape
from .names import offered_components, supports_input

if TYPE_CHECKING:
    from ..loading import ModelKit

C = ComponentType


def describe_hook_points(kit: "ModelKit") -> dict[str, Any]:
    """A JSON-ready listing of every hook point: layers, components, shapes, aliases."""
    info = kit.arch_info
    offered = offered_components(info, kit.native)
    per_layer = [c for c in offered if c is not C.EMBEDDING]
    layers = []
    for i in range(info.num_layers):
        layer_type = info.layer_type(i)
        layers.append(
            {
                "layer": i,
                "name": f"layers.{i}",
                "aliases": [f"{info.block_prefix}.{i}", f"blocks.{i}", str(i)],
                "attention_type": layer_type,
                "window": info.sliding_window if layer_type == "sliding_attention" else None,
                "components": {
                    c.value: {
                        "hook_id": f"layers.{i}.{c.value}",
                        "shape": row_shape(info, c),
                        "supports_input": supports_input(c, offered),
                    }
                    for c in per_layer
                },
            }
        )
    return {
        "model": kit.model_id,
        "model_type": kit.model_type,
        "native": kit.native,
        "num_layers": info.num_layers,
        "d_model": info.d_model,
        "n_heads": info.n_heads,
        "n_kv_heads": info.n_kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": info.vocab_size,
        "n_experts": info.n_experts,
        "experts_per_token": info.experts_per_token,
        "sliding_window": info.sliding_window,
        "d_mlp": info.d_mlp,
        "components": [c.value for c in offered],
        # What index i of a neuron site's last axis is (for MoE layers: which expert a row is, too).
        "neurons": {c.value: NEURON_MEANING[c] for c in offered if c in NEURON_MEANING},
        "post_norms": info.post_norms,
        "notes": _notes(info),
        "embedding": {"hook_id": "embedding", "shape": ["T", info.d_model]},
        "final_norm": {"hook_id": "final_norm", "component": "layernorm", "shape": ["T", info.d_model]},
        "layers": layers,
        "saes": describe_saes(info),
        "shape_symbols": {"T": "new positions in the pass", "S": "key positions attended (see key_positions)"},
    }


def describe_saes(info: Any) -> list[dict[str, Any]]:
    """The SAEs attached to the model (mlx_engine.attach_sae): each one's feature hook and the site it reads.

    Their features are hook points like the ones above, so a client learns their names here.
    """
    return [
        {"hook_id": s.hook_id, "site": s.base.hook_id, "layer": s.base.layer, "component": C.SAE_FEATURES.value,
         "d_sae": s.d_sae, "top_k": s.top_k, "hook_name": s.hook_name, "shape": ["T", s.top_k] if s.top_k else ["T", s.d_sae]}
        for s in getattr(info, "saes", ())
    ]


def _notes(info: Any) -> list[str]:
    """What a reader of this model's captures must know that the shapes do not say."""
    notes = []
    if info.post_norms:
        notes.append(
            "sandwich norms: 'attention' and 'mlp' are what is added to the residual stream (after each "
            "sublayer's post-norm), so attention + mlp = residual - resid_pre; 'attention_pre_norm' and "
            "'mlp_pre_norm' are the sublayer outputs before their post-norms"
        )
    if info.n_experts:
        notes.append("mixture of experts: expert_pre/expert_post rows are the experts each token was routed to")
    return notes
