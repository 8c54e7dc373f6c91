"""Steering vectors from contrasting prompts (activation addition).

The simplest steering vector that works on real models is a difference of means: run
prompts that have a property and prompts that lack it, average a layer's residual stream
over each set, subtract. Adding that difference (times a scale) back into the same layer
during generation pushes the model toward the property. Each prompt counts once whatever
its length: a prompt's positions are averaged first, then the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..generation.api import run_with_cache
from ..hooks.components import DIRECTION_COMPONENTS
from ..hooks.names import HookSpecError, resolve_hooks
from ..loading import ModelKit, tokenize
from .spec import InterventionError

Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class SteeringVector:
    """A direction at one hook point, and how it was made."""

    vector: mx.array  # [d_model], float32
    hook_id: str  # canonical id of the site it was measured at
    layer: Optional[int]
    layer_name: str  # canonical "layers.{i}" (or "embedding")
    component: str
    capture_input: bool
    n_positive: int
    n_negative: int
    last_token_only: bool

    @property
    def norm(self) -> float:
        return float(mx.linalg.norm(self.vector).item())

    def intervention(self, scale: float = 1.0, positions: Union[str, Sequence[int]] = "all") -> dict[str, Any]:
        """The `add` intervention that applies this vector times `scale` where it was measured."""
        return {
            "layer_name": self.layer_name,
            "component": self.component,
            "capture_input": self.capture_input,
            "op": "add",
            "vector": self.vector,
            "scale": scale,
            "positions": positions if isinstance(positions, str) else list(positions),
        }


def _prompt_mean(
    kit: ModelKit, prompt: Prompt, hook: dict[str, Any], hook_id: str, last_token_only: bool, drop_bos: bool
) -> np.ndarray:
    tokens = tokenize(kit, prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    rows = np.array(run_with_cache(kit, tokens, [hook])[hook_id].astype(mx.float32))
    if last_token_only:
        return rows[-1]
    bos = getattr(kit.tokenizer, "bos_token_id", None)
    if drop_bos and bos is not None and len(tokens) > 1 and tokens[0] == bos:
        # The BOS position is the same in every prompt and often has an outsized norm;
        # it carries nothing about the contrast.
        rows = rows[1:]
    return rows.mean(axis=0, dtype=np.float64)


def steering_vector(
    kit: ModelKit,
    positive: Sequence[Prompt],
    negative: Sequence[Prompt],
    layer: Union[int, str],
    *,
    component: str = "residual",
    capture_input: bool = False,
    last_token_only: bool = False,
    drop_bos: bool = True,
) -> SteeringVector:
    """mean(positive) - mean(negative) of a [T, d_model] hook over prompts (strings or token ids).

    Each prompt's rows are averaged over its positions (or only its last position with
    `last_token_only`, which suits properties of what comes next), then the prompts
    are averaged, so long prompts do not outweigh short ones. With `drop_bos` a leading
    BOS token is left out of the position average.
    """
    for name, prompts in (("positive", positive), ("negative", negative)):
        if isinstance(prompts, str) or not len(prompts):
            raise InterventionError(f"'{name}' must be a non-empty list of prompts (strings or token id lists).", param=name)
        for prompt in prompts:
            if not len(prompt):
                raise InterventionError(f"'{name}' holds an empty prompt.", param=name)
    hook = {"layer_name": layer, "component": component, "capture_input": capture_input, "capture_output": not capture_input}
    try:
        (resolved,) = resolve_hooks(kit.arch_info, kit.native, [hook])
    except HookSpecError as exc:
        raise InterventionError(str(exc).removeprefix("activation_hooks[0]: "), param="layer") from None
    if resolved.component not in DIRECTION_COMPONENTS:
        raise InterventionError(
            f"a steering vector lives in a [T, d_model] tensor; {resolved.component.value!r} is not one "
            "(use residual, attention, mlp, layernorm or embedding).",
            param="component",
        )
    means = {
        name: np.mean([_prompt_mean(kit, p, hook, resolved.hook_id, last_token_only, drop_bos) for p in prompts], axis=0)
        for name, prompts in (("positive", positive), ("negative", negative))
    }
    vector = mx.array((means["positive"] - means["negative"]).astype(np.float32))
    return SteeringVector(
        vector=vector,
        hook_id=resolved.hook_id,
        layer=resolved.layer,
        layer_name=resolved.layer_name,
        component=resolved.component.value,
        capture_input=resolved.is_input,
        n_positive=len(positive),
        n_negative=len(negative),
        last_token_only=last_token_only,
    )


__all__ = ["SteeringVector", "steering_vector"]
