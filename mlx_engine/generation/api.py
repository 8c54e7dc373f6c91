"""The public capture API: generation with activations, and one forward with a cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .generate import generate_steps
from .generation_types import GenerationResult
from .hooks.capture import Capture, StepActivations
from .hooks.manager import CaptureBudgetError, CaptureSession, HookRequest, _estimate, _param_itemsize
from .interventions import InterventionRequest, ResolvedIntervention, resolve_capture_edits, resolve_interventions
from .model_kit import ModelKit, tokenize


def create_generator_with_activations(
    kit: ModelKit,
    prompt_tokens: Sequence[int],
    activation_hooks: Iterable[HookRequest] = (),
    *,
    interventions: Optional[Iterable[InterventionRequest]] = None,
    capture_budget_bytes: Optional[int] = None,
    **generation_kwargs: Any,
) -> Iterator[tuple[GenerationResult, StepActivations]]:
    """Stream (result, activations) pairs; activations maps hook id to this step's captures.

    The request is validated and its capture size estimated before anything runs, so
    a bad hook, a bad intervention or an over-budget request fails without generating.
    `interventions` (see mlx_engine.interventions) edit the model's tensors in the same
    run: a capture downstream of an edit sees the edited value, and a capture at the
    edited hook itself sees it "after" the edit unless its spec says `"edit": "before"`.
    Captures are evaluated together with the step's logits; nothing is kept after a step
    is handed out.
    """
    resolved, capture_edits = resolve_capture_edits(kit, list(activation_hooks))
    edits = resolve_interventions(
        kit, interventions, prompt_len=len(prompt_tokens), max_tokens=generation_kwargs.get("max_tokens", 256)
    )
    if capture_budget_bytes is not None:
        estimate = _estimate(
            kit.arch_info, resolved, len(prompt_tokens), generation_kwargs.get("max_tokens", 256), _param_itemsize(kit)
        )
        if estimate > capture_budget_bytes:
            raise CaptureBudgetError(estimate, capture_budget_bytes)
    return _run(kit, prompt_tokens, resolved, generation_kwargs, edits, capture_edits)


def _run(
    kit: ModelKit,
    prompt_tokens: Sequence[int],
    resolved: list,
    generation_kwargs: dict,
    edits: Sequence[ResolvedIntervention] = (),
    capture_edits: Optional[dict[str, str]] = None,
) -> Iterator[tuple[GenerationResult, StepActivations]]:
    session = CaptureSession(kit, resolved, edits, capture_edits)
    session.arm()
    try:
        yield from generate_steps(kit, prompt_tokens, recorder=session, **generation_kwargs)
    finally:
        session.disarm()


@dataclass
class CacheResult:
    """One forward pass over a prompt: its logits [T, vocab] and each hook's capture."""

    tokens: list[int]
    logits: mx.array
    activations: dict[str, Capture]

    def __getitem__(self, hook_id: str) -> mx.array:
        return self.activations[hook_id].array


def run_with_cache(
    kit: ModelKit,
    text_or_tokens: Union[str, Sequence[int]],
    hooks: Iterable[HookRequest] = (),
    *,
    interventions: Optional[Iterable[InterventionRequest]] = None,
) -> CacheResult:
    """Run the prompt once (no generation) and return every requested hook's tensor.

    With `interventions` the forward runs edited (logits included); captures compose
    with edits as in create_generator_with_activations.
    """
    tokens = tokenize(kit, text_or_tokens) if isinstance(text_or_tokens, str) else [int(t) for t in text_or_tokens]
    if not tokens:
        raise ValueError("The prompt is empty: give at least one token.")
    resolved, capture_edits = resolve_capture_edits(kit, list(hooks))
    edits = resolve_interventions(kit, interventions, prompt_len=len(tokens))
    session = CaptureSession(kit, resolved, edits, capture_edits)
    session.arm()
    try:
        cache = make_prompt_cache(kit.model)
        session.begin_pass(0, 0, len(tokens))
        logits = kit.model(mx.array(tokens, dtype=mx.uint32)[None], cache=cache)[0]
        captures = session.end_pass()
    finally:
        session.disarm()
    arrays = [logits]
    for c in captures:
        arrays.append(c.array)
        arrays.extend(c.extras.values())
        if isinstance(c.key_positions, mx.array):
            arrays.append(c.key_positions)
    mx.eval(*arrays)
    for c in captures:
        if isinstance(c.key_positions, mx.array):
            c.key_positions = c.key_positions.tolist()
    return CacheResult(tokens=tokens, logits=logits, activations={c.hook_id: c for c in captures})
