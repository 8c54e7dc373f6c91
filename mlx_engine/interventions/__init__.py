"""Interventions: edit a hook point's tensor during a forward pass (steering, ablation, patching).

spec (parse, model-free checks) -> resolve (the model's shapes, numpy only) -> ops
(bind to a run, apply in the forward pass); sources reads captures used as operands,
steering builds difference-of-means vectors.
"""

from .ops import BoundIntervention, bind_interventions, prepare_interventions
from .resolve import InterventionRequest, ResolvedIntervention, resolve_interventions
from .spec import OPS, InterventionError, InterventionSpec, parse_intervention

__all__ = [
    "BoundIntervention",
    "InterventionError",
    "InterventionRequest",
    "InterventionSpec",
    "OPS",
    "ResolvedIntervention",
    "bind_interventions",
    "parse_intervention",
    "prepare_interventions",
    "resolve_interventions",
]
