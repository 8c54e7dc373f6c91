"""The vocabulary of capture sites, and the shape of each component's tensor.

Everything that needs a component's shape (the hook listing, the capture budget, the
intervention checks) reads it here, so the shapes are written down once.
"""

from __future__ import annotations

from enum import Enum
from typing import Union

from .architecture import ArchitectureInfo


class ComponentType(str, Enum):
    """The ten components every native architecture offers, plus `z` and the MoE router.

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
# Scores and patterns are [H, T, S] over the keys attended.
KEYED_COMPONENTS: tuple[ComponentType, ...] = (C.ATTENTION_SCORES, C.ATTENTION_PATTERN)
# Components whose sublayer input can be captured too (`capture_input`).
INPUT_COMPONENTS: tuple[ComponentType, ...] = (C.RESIDUAL, C.ATTENTION, C.MLP, C.LAYERNORM)
# Components an intervention may edit.
EDITABLE_COMPONENTS: tuple[ComponentType, ...] = MODULE_COMPONENTS + HEAD_COMPONENTS
# Components a steering vector (one [d_model] direction) lives in.
DIRECTION_COMPONENTS: tuple[ComponentType, ...] = (C.RESIDUAL, C.ATTENTION, C.MLP, C.LAYERNORM, C.EMBEDDING)

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
    return ["T", info.d_model]


def position_shape(info: ArchitectureInfo, component: ComponentType) -> tuple[int, int]:
    """(heads, width) of one position of an editable site: (0, d_model) where there is no head axis."""
    if component in (C.QUERY, C.Z):
        return info.n_heads, info.head_dim
    if component in (C.KEY, C.VALUE):
        return info.n_kv_heads, info.head_dim
    return 0, info.d_model


def elements_per_position(info: ArchitectureInfo, component: ComponentType) -> int:
    """Elements captured per new position, for every component but scores and patterns."""
    if component is C.ROUTER:
        return (info.n_experts or 0) + 2 * (info.experts_per_token or 0)
    heads, width = position_shape(info, component)
    return max(heads, 1) * width
