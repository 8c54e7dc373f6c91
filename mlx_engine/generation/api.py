"""The public generation API: streaming with activations, plain streaming, and one forward with a cache.

There is one path: `create_generator` is `create_generator_with_activations` with no
hooks. Hooks and interventions are resolved once, here, before anything runs (already
resolved ones pass through), so a bad hook, a bad intervention or an over-budget
request fails without generating.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..hooks.budget import check_budget
from ..hooks.capture import StepActivations
from ..hooks.names import HookRequest, ResolvedHook, resolve_hooks, resolve_requests
from ..hooks.session import HookSession
from ..interventions.ops import BoundIntervention, bind_interventions
from ..interventions.resolve import InterventionRequest, resolve_interventions
from ..loading import ModelKit, tokenize
from .cache import ActivationCache
from .chunks import join_chunks
from .loop import DEFAULT_PREFILL_STEP, Sampling, TokenStep, head_kwargs, token_steps
from .text import TextStream
from .types import GenerationResult

_SAMPLING_FIELDS = {f.name for f in fields(Sampling)}


def sampling_args(kwargs: dict[str, Any]) -> tuple[Sampling, tuple[str, ...]]:
    unknown = set(kwargs) - _SAMPLING_FIELDS - {"stop_strings"}
    if unknown:
        raise TypeError(f"unknown generation argument(s) {sorted(unknown)}; valid: {', '.join(sorted(_SAMPLING_FIELDS | {'stop_strings'}))}")
    stop = tuple(kwargs.get("stop_strings") or ())
    return Sampling(**{k: v for k, v in kwargs.items() if k in _SAMPLING_FIELDS}), stop


def _bound(kit: ModelKit, interventions: Optional[Iterable[InterventionRequest]], prompt_len: int, max_tokens: int,
           sources: Optional[Mapping[str, Any]]) -> list[BoundIntervention]:
    resolved = resolve_interventions(kit.arch_info, kit.native, interventions)
    return bind_interventions(resolved, prompt_len=prompt_len, max_tokens=max_tokens, sources=sources)


def create_generator_with_activations(
    kit: ModelKit,
    prompt_tokens: Sequence[int],
    activation_hooks: Iterable[HookRequest] = (),
    *,
    interventions: Optional[Iterable[InterventionRequest]] = None,
    capture_budget_bytes: Optional[int] = None,
    sources: Optional[Mapping[str, Any]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    **generation_kwargs: Any,
) -> Iterator[tuple[GenerationResult, StepActivations]]:
    """Stream (result, activations) pairs; activations maps hook id to this step's captures.

    Keyword arguments: max_tokens, temp, top_p, top_k, min_p, seed, stop_strings,
    top_logprobs, prefill_step_size. `interventions` (see mlx_engine.interventions) edit
    the model's tensors in the same run: a capture downstream of an edit sees the edited
    value, and a capture at the edited hook itself sees it "after" the edit unless its spec
    says `"edit": "before"`. `sources` maps a `capture_id` to a stored capture. Captures are
    evaluated together with the step's logits; nothing is kept after a step is handed out.
    `should_stop` is asked between prefill chunks; True ends the prefill with
    GenerationCancelled (a server whose client left stops within one chunk).
    """
    sampling, stop = sampling_args(generation_kwargs)
    hooks = resolve_hooks(kit.arch_info, kit.native, activation_hooks)
    edits = _bound(kit, interventions, len(prompt_tokens), sampling.max_tokens, sources)
    if capture_budget_bytes is not None:
        check_budget(kit.arch_info, hooks, len(prompt_tokens), sampling.max_tokens, kit.activation_itemsize, capture_budget_bytes)
    return _generate(kit, prompt_tokens, hooks, edits, sampling, stop, should_stop)


def _generate(
    kit: ModelKit,
    prompt_tokens: Sequence[int],
    hooks: list[ResolvedHook],
    edits: list[BoundIntervention],
    sampling: Sampling,
    stop: tuple[str, ...],
    should_stop: Optional[Callable[[], bool]] = None,
) -> Iterator[tuple[GenerationResult, StepActivations]]:
    session = HookSession(kit.hook_points, hooks, edits)
    session.arm()
    try:
        text = TextStream(kit.tokenizer.detokenizer, kit.eos_token_ids, stop, sampling.max_tokens)
        for step in token_steps(kit, prompt_tokens, session, sampling, should_stop):
            result = step_result(step, text, len(prompt_tokens))
            yield result, step.activations
            if result.finish_reason is not None:
                break
    finally:
        session.disarm()


def step_result(step: TokenStep, text: TextStream, n_prompt: int) -> GenerationResult:
    """The GenerationResult for one token: its text and, on the last one, the finish reason."""
    piece, finish = text.push(step.token, step.step)
    return GenerationResult(
        text=piece,
        token=step.token,
        step=step.step,
        logprob=step.logprob,
        top_logprobs=step.top_logprobs,
        finish_reason=finish,
        prompt_tokens=n_prompt,
        generation_tokens=step.step + 1,
        prompt_tps=step.prompt_tps,
        generation_tps=step.generation_tps,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def create_generator(
    kit: ModelKit, prompt_tokens: Sequence[int], *, interventions: Optional[Iterable[InterventionRequest]] = None, **generation_kwargs: Any
) -> Iterator[GenerationResult]:
    """Stream GenerationResults for a prompt: the capture loop with no hooks.

    Takes the keyword arguments of `create_generator_with_activations`; interventions are
    checked here, before the first token is asked for.
    """
    steps = create_generator_with_activations(kit, prompt_tokens, (), interventions=interventions, **generation_kwargs)
    return _results(steps)


def _results(steps: Iterator[tuple[GenerationResult, StepActivations]]) -> Iterator[GenerationResult]:
    try:
        for result, _ in steps:
            yield result
    finally:
        steps.close()  # type: ignore[attr-defined]  # disarms an intervention session at once


def run_with_cache(
    kit: ModelKit,
    text_or_tokens: Union[str, Sequence[int]],
    hooks: Iterable[HookRequest] = (),
    *,
    interventions: Optional[Iterable[InterventionRequest]] = None,
    sources: Optional[Mapping[str, Any]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    logits: Literal["all", "last"] = "all",
) -> ActivationCache:
    """Run the prompt once (no generation) and return every requested hook's tensor.

    The prompt goes through in chunks of `prefill_step_size` positions with a KV cache, as
    generation prefills it, so memory is bounded by the chunk rather than by T x T; each
    hook's chunks are joined into one capture over the whole prompt (scores and patterns
    over the union of their key positions, masked columns at -inf and 0). The cache is
    indexed by the names the hooks were asked by and by their canonical ids. With
    `interventions` the forward runs edited (logits included); captures compose with
    edits as in create_generator_with_activations.

    `logits="all"` returns every position's logits [T, vocab], as TransformerLens does;
    `"last"` returns the last position's alone [1, vocab] and skips the LM head elsewhere,
    which at 8192 tokens and a 32k vocabulary saves 1 GiB and 400 GFLOP of a capture run.
    """
    if logits not in ("all", "last"):
        raise ValueError(f'logits must be "all" (every position) or "last" (the last position only), got {logits!r}.')
    tokens = tokenize(kit, text_or_tokens) if isinstance(text_or_tokens, str) else [int(t) for t in text_or_tokens]
    if not tokens:
        raise ValueError("The prompt is empty: give at least one token.")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}.")
    requests = resolve_requests(kit.arch_info, kit.native, hooks)
    resolved = [r for _, rs in requests for r in rs]
    # A hook asked by a plain name ("blocks.1.hook_resid_post") is found under that name too.
    aliases = {raw: r.hook_id for raw, rs in requests if isinstance(raw, str) for r in rs}
    edits = _bound(kit, interventions, len(tokens), 0, sources)
    session = HookSession(kit.hook_points, resolved, edits)
    prompt = mx.array(tokens, dtype=mx.uint32)
    chunks: list[Any] = []
    all_logits: Optional[mx.array] = None
    last_kwargs = head_kwargs(kit) if logits == "last" else {}
    session.arm()
    try:
        cache = make_prompt_cache(kit.model)
        for start in range(0, len(tokens), prefill_step_size):
            end = min(start + prefill_step_size, len(tokens))
            session.begin_pass(0, start, end)
            chunk_logits = kit.model(prompt[start:end][None], cache=cache, **last_kwargs)[0]
            if logits == "last":
                all_logits = chunk_logits[-1:]
            else:
                if all_logits is None:
                    # Written chunk by chunk into one array: joining the chunks at the end would
                    # hold every position's logits twice (2 GiB at 8192 tokens and a 32k vocabulary).
                    all_logits = mx.zeros((len(tokens), *chunk_logits.shape[1:]), dtype=chunk_logits.dtype)
                all_logits[start:end] = chunk_logits
            captures = session.end_pass()
            mx.eval(all_logits, [a for c in captures for a in c.lazy_arrays()], [c.state for c in cache])
            del chunk_logits
            for c in captures:
                c.settle()
            chunks.extend(captures)
    finally:
        session.disarm()
    joined = join_chunks(chunks, len(tokens))
    assert all_logits is not None  # the prompt has at least one token
    return ActivationCache(tokens, all_logits, joined, aliases)
