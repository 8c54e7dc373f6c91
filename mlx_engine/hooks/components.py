"""The vocabulary of capture sites a researcher can ask for."""

from __future__ import annotations

from enum import Enum


class ComponentType(str, Enum):
    """The ten components every native architecture offers, plus the MoE router.

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


# The ten components of the contract (ARCHITECTURE.md); `router` is MoE-only and `z`
# (per-head attention output before the output projection) serves interventions.
CORE_COMPONENTS: tuple[ComponentType, ...] = (
    ComponentType.RESIDUAL,
    ComponentType.ATTENTION,
    ComponentType.MLP,
    ComponentType.EMBEDDING,
    ComponentType.LAYERNORM,
    ComponentType.ATTENTION_SCORES,
    ComponentType.ATTENTION_PATTERN,
    ComponentType.KEY,
    ComponentType.QUERY,
    ComponentType.VALUE,
)

# Components whose tensors live per layer (everything but the embedding).
LAYER_COMPONENTS: tuple[ComponentType, ...] = tuple(
    c for c in ComponentType if c is not ComponentType.EMBEDDING
)
