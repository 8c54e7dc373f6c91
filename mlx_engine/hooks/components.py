"""The vocabulary of capture sites, and the shape of each component's tensor.

Everything that needs a component's shape (the hook listing, the capture budget, the
intervention checks) reads it here, so the shapes are written down once.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional, Union

from .architecture import ArchitectureInfo


class ComponentType(str, Enum):
    """The ten components every native architecture offers, plus `z`, the MoE router and the neuron sites.

    A `str` enum so a component compares equal to its wire name ("residual") and
    serialises without help.
    """

    RESIDUAL = "residual"
    ATTENTION = "attention"
    MLP = "mlp"
    EMBEDDING = "embedding"
    LAYERNORM = "layernorm"
    ATTENTION_SCORES = "attention_scores"
    ATTENTION_PATTERN = "attention_pattern"
    KEY = "key"
    QUERY = "query"
    VALUE = "value"
    ROUTER = "router"
    Z = "z"
    RESID_MID = "resid_mid"
    MLP_PRE = "mlp_pre"
    MLP_POST = "mlp_post"
    EXPERT_PRE = "expert_pre"
    EXPERT_POST = "expert_post"
    ATTENTION_PRE_NORM = "attention_pre_norm"
    MLP_PRE_NORM = "mlp_pre_norm"
    SAE_FEATURES = "sae_features"

    def __str__(self) -> str:  # f"{component}" gives the wire name
        return self.value


C = ComponentType

# The ten components of the contract (docs/architecture.md); `router` is MoE-only and `z`
# (per-head attention output before the output projection) serves interventions.
CORE_COMPONENTS: tuple[ComponentType, ...] = (
    C.RESIDUAL, C.ATTENTION, C.MLP, C.EMBEDDING, C.LAYERNORM,
    C.ATTENTION_SCORES, C.ATTENTION_PATTERN, C.KEY, C.QUERY, C.VALUE,
)
# What a fallback (mlx-lm) model offers: the module-level components only.
MODULE_COMPONENTS: tuple[ComponentType, ...] = (C.EMBEDDING, C.RESIDUAL, C.ATTENTION, C.MLP, C.LAYERNORM)
# Components whose tensors are [H, T, head_dim]: per-head edits (`heads`) apply here.
HEAD_COMPONENTS: tuple[ComponentType, ...] = (C.QUERY, C.KEY, C.VALUE, C.Z)
# The MLP's hidden units: [T, d_mlp] for a dense MLP.
NEURON_COMPONENTS: tuple[ComponentType, ...] = (C.MLP_PRE, C.MLP_POST)
# The routed experts' hidden units: [T, k, d_expert], the k experts each token was routed to.
EXPERT_COMPONENTS: tuple[ComponentType, ...] = (C.EXPERT_PRE, C.EXPERT_POST)
# Sandwich-norm models (Gemma, OLMo 2) normalise each sublayer's output before the residual add:
# `attention`/`mlp` are what is added (after the post-norm); these are the outputs before it.
POST_NORM_COMPONENTS: tuple[ComponentType, ...] = (C.ATTENTION_PRE_NORM, C.MLP_PRE_NORM)
# The features of an SAE attached at a site (mlx_engine/sae/attach.py): [T, d_sae], or the k largest
# per position as ids [T, k] with their `values` as an extra; offered only where an SAE is attached.
SAE_COMPONENTS: tuple[ComponentType, ...] = (C.SAE_FEATURES,)
# What every native dense model offers beyond the contract's ten.
NATIVE_EXTRA_COMPONENTS: tuple[ComponentType, ...] = (C.Z, C.RESID_MID)
# Scores and patterns are [H, T, S] over the keys attended.
KEYED_COMPONENTS: tuple[ComponentType, ...] = (C.ATTENTION_SCORES, C.ATTENTION_PATTERN)
# Components whose sublayer input can be captured too (`capture_input`).
INPUT_COMPONENTS: tuple[ComponentType, ...] = (C.RESIDUAL, C.ATTENTION, C.MLP, C.LAYERNORM)
# Components an intervention may edit.
EDITABLE_COMPONENTS: tuple[ComponentType, ...] = (
    MODULE_COMPONENTS + HEAD_COMPONENTS + (C.RESID_MID,) + NEURON_COMPONENTS + EXPERT_COMPONENTS + POST_NORM_COMPONENTS
    + SAE_COMPONENTS
)
# Components a steering vector (one [d_model] direction) lives in.
DIRECTION_COMPONENTS: tuple[ComponentType, ...] = (C.RESIDUAL, C.ATTENTION, C.MLP, C.LAYERNORM, C.EMBEDDING, C.RESID_MID)

# What a neuron index means, per component, for the hook listing.
NEURON_MEANING: dict[ComponentType, str] = {
    C.MLP_PRE: "column i of the MLP's pre-activation (the gate projection of a gated MLP, c_fc of GPT-2)",
    C.MLP_POST: "hidden unit i entering the down projection (act(gate) * up for a gated MLP)",
    C.EXPERT_PRE: "row j is the j-th expert the token was routed to (its id in extras 'experts'); column i is "
    "that expert's gate pre-activation unit i",
    C.EXPERT_POST: "row j is the j-th expert the token was routed to (its id in extras 'experts'); column i is "
    "that expert's hidden unit i entering its down projection",
}

Shape = list[Union[int, str]]


def row_shape(info: ArchitectureInfo, component: ComponentType) -> Shape:
    """Shape of one pass's capture, with T (new positions) and S (keys) symbolic."""
    if component in (C.QUERY, C.Z):
        return [info.n_heads, "T", info.head_dim]
    if component in (C.KEY, C.VALUE):
        return [info.n_kv_heads, "T", info.head_dim]
    if component in KEYED_COMPONENTS:
        return [info.n_heads, "T", "S"]
    if component is C.ROUTER:
        return ["T", info.n_experts or 0]
    if component in NEURON_COMPONENTS:
        return ["T", info.d_mlp or 0]
    if component in EXPERT_COMPONENTS:
        return ["T", info.experts_per_token or 0, info.d_mlp or 0]
    if component is C.SAE_FEATURES:
        return ["T", max([s.d_sae for s in getattr(info, "saes", ())], default=0)]
    return ["T", info.d_model]


def position_shape(info: ArchitectureInfo, component: ComponentType) -> tuple[int, int]:
    """(heads, width) of one position of an editable site: (0, d_model) where there is no head axis.

    For the routed experts the "heads" are the k experts a token was routed to.
    """
    if component in (C.QUERY, C.Z):
        return info.n_heads, info.head_dim
    if component in (C.KEY, C.VALUE):
        return info.n_kv_heads, info.head_dim
    if component in NEURON_COMPONENTS:
        return 0, info.d_mlp or 0
    if component in EXPERT_COMPONENTS:
        return info.experts_per_token or 0, info.d_mlp or 0
    if component is C.SAE_FEATURES:
        return 0, sae_width(info)
    return 0, info.d_model


def sae_width(info: ArchitectureInfo) -> int:
    """d_sae of the SAEs attached to the model (`info.saes`, set by mlx_engine.sae.attach_sae).

    A feature intervention given as a dict is checked against this one width; SAEs of different
    widths take theirs from `AttachedSAE.interventions`, which resolves against one SAE.
    """
    widths = sorted({s.d_sae for s in getattr(info, "saes", ())})
    if len(widths) > 1:
        raise ValueError(
            f"SAEs of different widths {widths} are attached, so a feature intervention given as a dict is ambiguous; "
            "resolve it with the AttachedSAE's interventions(...)."
        )
    return widths[0] if widths else 0


def elements_per_position(info: ArchitectureInfo, component: ComponentType, features: Optional[int] = None) -> int:
    """Elements captured per new position, for every component but scores and patterns.

    `features` is the size of a requested subset of the last axis (None: all of it).
    """
    if component is C.ROUTER:
        return (info.n_experts or 0) + 2 * (info.experts_per_token or 0)
    if component is C.SAE_FEATURES:  # the widest attached SAE: an upper bound (top-k captures: ids and values)
        return max([2 * s.top_k if s.top_k else features or s.d_sae for s in getattr(info, "saes", ())], default=0)
    heads, width = position_shape(info, component)
    extra = info.experts_per_token or 0 if component in EXPERT_COMPONENTS else 0  # the expert ids
    return max(heads, 1) * (width if features is None else features) + extra
