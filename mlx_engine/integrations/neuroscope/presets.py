"""Hook sets for common analyses, named so the loaded model accepts them.

Without a hook-point listing the presets use the canonical names every native model
offers (`embedding`, `layers.{i}` with a component). Given the listing of the model
(GET /v1/models/{id}/hook_points), they take layer names from it and refuse a layer or
component the model does not offer, naming what it does offer: a fallback model, for
instance, has no query/key/value, and that is better said before a generation than
discovered in its error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

CIRCUIT_COMPONENTS: tuple[str, ...] = ("residual", "attention", "mlp")
ATTENTION_COMPONENTS: tuple[str, ...] = (
    "attention",
    "attention_scores",
    "attention_pattern",
    "query",
    "key",
    "value",
)

HookSpecDict = dict[str, Any]


def _layer_listing(hook_points: Mapping[str, Any], layer: int) -> Mapping[str, Any]:
    layers = hook_points["layers"]
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: model {hook_points.get('model')!r} has {len(layers)} layers")
    return layers[layer]


def _layer_spec(layer: int, component: str, hook_points: Optional[Mapping[str, Any]]) -> HookSpecDict:
    if hook_points is None:
        return {"layer_name": f"layers.{layer}", "component": component}
    listing = _layer_listing(hook_points, layer)
    offered = listing["components"]
    if component not in offered:
        raise ValueError(
            f"layer {layer} of model {hook_points.get('model')!r} offers no {component!r}; "
            f"it offers {', '.join(offered)}"
        )
    return {"layer_name": listing["name"], "component": component}


def _embedding_spec(hook_points: Optional[Mapping[str, Any]]) -> HookSpecDict:
    if hook_points is not None and "embedding" not in hook_points.get("components", ()):
        raise ValueError(f"model {hook_points.get('model')!r} offers no embedding hook")
    hook_id = hook_points["embedding"]["hook_id"] if hook_points is not None else "embedding"
    return {"layer_name": hook_id, "component": "embedding"}


def create_hook_specs_for_circuit_analysis(
    num_layers: Optional[int] = None,
    components: Sequence[str] = CIRCUIT_COMPONENTS,
    hook_points: Optional[Mapping[str, Any]] = None,
) -> list[HookSpecDict]:
    """The embedding, then `components` of layers 0..num_layers-1 (all layers when the listing is given)."""
    if num_layers is None:
        if hook_points is None:
            raise ValueError("give num_layers, or the model's hook_points listing to take all its layers")
        num_layers = int(hook_points["num_layers"])
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, not {num_layers}")
    specs = [_embedding_spec(hook_points)]
    for layer in range(num_layers):
        specs.extend(_layer_spec(layer, c, hook_points) for c in components)
    return specs


def create_attention_analysis_hooks(
    layers: Iterable[int],
    hook_points: Optional[Mapping[str, Any]] = None,
    components: Sequence[str] = ATTENTION_COMPONENTS,
) -> list[HookSpecDict]:
    """Attention output, scores, pattern, queries, keys and values of each of `layers`."""
    return [_layer_spec(int(layer), c, hook_points) for layer in layers for c in components]


def create_neuron_hooks(
    layers: Iterable[int],
    hook_points: Optional[Mapping[str, Any]] = None,
    indices: Optional[Sequence[int]] = None,
) -> list[HookSpecDict]:
    """The MLP neurons of each of `layers` (`mlp_post`, or `expert_post` on an MoE model), optionally a subset.

    With the listing, an MoE model (one that offers `expert_post`) gets the routed experts' units.
    """
    component = "mlp_post"
    if hook_points is not None and "expert_post" in hook_points.get("components", ()):
        component = "expert_post"
    specs = [_layer_spec(int(layer), component, hook_points) for layer in layers]
    if indices is not None:
        for spec in specs:
            spec["indices"] = list(indices)
    return specs
