"""A generation as the engine thread runs it: tokenize, check length and budget, bind interventions,
generate, parse, encode, store.

Everything that touches the tokenizer or MLX happens here, on the engine thread; what
leaves is plain data (`Started`, `Step`, `Finished`) that a request thread turns into
OpenAI JSON. Harmony models (gpt-oss) are parsed here at token level, and their stop
strings are matched against the visible content only, so a stop string cannot fire
inside the reasoning or a channel header.

A request's length is checked twice: on the request thread before it is queued, with
what is known without tokenizing (`GenerationPlan.check_length`: token ids exactly,
texts by a lower bound), and here, exactly, once the prompt is tokens.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional, Union

from jinja2 import TemplateError

from ..distributed.serve import Leader, RankLostError
from ..generation.api import create_generator_with_activations
from ..generation.harmony import HarmonyStreamParser, HarmonyTokens, Route
from ..generation.loop import GenerationCancelled
from ..generation.text import StopStringMatcher
from ..hooks.budget import CaptureBudgetError, check_budget
from ..hooks.capture import Capture
from ..hooks.names import HookSpecError, ResolvedHook
from ..interventions.resolve import ResolvedIntervention
from ..loading import chat_tokens, tokenize
from ..wire.codec import encode_capture
from ..wire.files import captures_to_safetensors
from .batching import Batcher
from .capture_store import CaptureStore
from .context import chat_texts
from .engine import Adopt, Cancelled, EventStream
from .errors import APIError
from .intervention_sources import bind_request_interventions
from .loaded_models import LoadedModel

log = logging.getLogger("mlx_engine.server.jobs")


@dataclass(frozen=True)
class GenerationPlan:
    """A validated request, reduced to what the engine needs."""

    request_id: str
    model: LoadedModel
    messages: Optional[list[dict[str, str]]] = None  # chat
    prompt: Union[str, list[int], None] = None  # text completion
    max_tokens: int = 256
    max_tokens_given: bool = True  # False: the server's default, lowered to what the context has room for
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    hooks: Optional[list[ResolvedHook]] = None  # resolved on the request thread; None: no capture
    activation_format: str = "json"
    interventions: Optional[list[ResolvedIntervention]] = None  # resolved on the request thread; None: none sent

    @property
    def harmony(self) -> bool:
        return self.messages is not None and self.model.harmony_tokens is not None

    @property
    def prompt_param(self) -> str:
        return "messages" if self.messages is not None else "prompt"

    @property
    def asked_max_tokens(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens_given else None

    def check_length(self) -> None:
        """Before queueing: refuse a prompt that cannot fit (token ids exactly, texts by a lower bound)."""
        limits = self.model.limits
        if self.messages is not None:
            limits.check_texts(chat_texts(self.messages), self.asked_max_tokens, "messages")
        elif isinstance(self.prompt, str):
            limits.check_texts([self.prompt], self.asked_max_tokens, "prompt")
        elif self.prompt is not None:
            limits.check(len(self.prompt), self.asked_max_tokens, "prompt")


@dataclass(frozen=True)
class TopAlternative:
    token_id: int
    token_text: str
    logprob: float


@dataclass(frozen=True)
class Started:
    prompt_token_ids: list[int]
    prompt_tokens_text: list[str]
    capture_id: Optional[str]
    interventions: Optional[list[dict[str, Any]]] = None  # as resolved; None when the request sent none


@dataclass(frozen=True)
class Step:
    token_id: int
    token_text: str
    content: str
    reasoning: str
    route: Route
    logprob: float
    top_logprobs: list[TopAlternative]
    activations: Optional[dict[str, list[dict[str, Any]]]]


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    capture_id: Optional[str]
    capture_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache


@dataclass
class _Totals:
    generated_ids: list[int] = field(default_factory=list)
    generated_text: list[str] = field(default_factory=list)
    reasoning_tokens: int = 0


def _prompt_ids(plan: GenerationPlan) -> list[int]:
    kit = plan.model.kit
    try:
        if plan.messages is not None:
            return chat_tokens(kit, plan.messages)
        if isinstance(plan.prompt, str):
            return tokenize(kit, plan.prompt)
        return list(plan.prompt or [])
    except (ValueError, TemplateError) as exc:
        raise APIError(f"Could not build the prompt: {exc}", param="messages" if plan.messages is not None else "prompt") from exc


def _token_text(kit: Any, token: int) -> str:
    return kit.tokenizer.decode([token])


class _HarmonyText:
    """Content and reasoning of a Harmony completion, token by token, with stop strings on the content."""

    def __init__(self, decode: Callable[[Sequence[int]], str], tokens: HarmonyTokens, stop: tuple[str, ...]) -> None:
        self.parser = HarmonyStreamParser(decode, tokens)
        self.stopper = StopStringMatcher(stop)

    def push(self, result: Any) -> tuple[str, str, Route, Optional[str]]:
        """(content, reasoning, route, finish reason) for one generated token."""
        delta = self.parser.push(result.token)
        route = delta.route
        if result.finish_reason is not None:
            delta = delta + self.parser.finish()
        content, hit = self.stopper.push(delta.content)
        if hit:
            return content, delta.reasoning, route, "stop"
        if result.finish_reason is not None:
            content += self.stopper.flush()
        return content, delta.reasoning, route, result.finish_reason


def run_generation(
    plan: GenerationPlan,
    stream: EventStream,
    store: CaptureStore,
    budget_bytes: Optional[int],
    batcher: Optional[Batcher] = None,
    leader: Optional[Leader] = None,
) -> Optional[Adopt]:
    """The engine-thread job behind every completion request (see module docstring).

    With a `batcher`, a request that may be batched prefills here and returns the `Adopt`
    that hands its decoding to the batch; any other runs to its end here. With a `leader`
    (a model-parallel job) every generation runs through it, never batched: the other
    ranks run each forward pass in lockstep with this one, which a batch's rows joining
    and leaving between steps would break. A lost rank becomes a 503 naming it.
    """
    try:
        return _run_generation(plan, stream, store, budget_bytes, batcher, leader)
    except RankLostError as exc:
        raise _rank_lost(exc) from exc


def _rank_lost(exc: RankLostError) -> APIError:
    return APIError(str(exc), status=503, type="server_error", code="rank_lost")


def _report_stall(stream: EventStream, exc: RankLostError) -> None:
    """From the leader's watchdog: this thread is stuck in a collective, so the error goes to the reader from there."""
    try:
        stream.emit(_rank_lost(exc))
    except Cancelled:
        pass  # the reader is gone already


def _run_generation(
    plan: GenerationPlan,
    stream: EventStream,
    store: CaptureStore,
    budget_bytes: Optional[int],
    batcher: Optional[Batcher],
    leader: Optional[Leader],
) -> Optional[Adopt]:
    kit = plan.model.kit
    prompt_ids = _prompt_ids(plan)
    limits = plan.model.limits
    limits.check(len(prompt_ids), plan.asked_max_tokens, plan.prompt_param)
    max_tokens = plan.max_tokens if plan.max_tokens_given else limits.completion_room(len(prompt_ids), plan.max_tokens)
    kwargs: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temp=plan.temperature,
        top_p=plan.top_p,
        seed=plan.seed,
        stop_strings=() if plan.harmony else plan.stop,
        top_logprobs=plan.top_logprobs,
    )
    # Interventions are bound to the prompt (and stored captures read) before any generation.
    edits = bind_request_interventions(plan.interventions or [], plan.model, len(prompt_ids), max_tokens, store)
    edited = [e.metadata() for e in edits] if plan.interventions is not None else None
    # The capture budget is checked here, before any generation, counting the response's encoded copy.
    if budget_bytes is not None and plan.hooks:
        itemsize = kit.activation_itemsize
        check_budget(kit.arch_info, plan.hooks, len(prompt_ids), max_tokens, itemsize, budget_bytes, encoding=plan.activation_format)

    # Between prefill chunks the loop asks whether the reader left (client gone, server stopping).
    def should_stop() -> bool:
        return stream.cancelled

    pairs: Optional[Iterator[tuple[Any, Any]]] = None
    if leader is not None:
        on_stall = partial(_report_stall, stream)
        pairs = leader.generate(kit, prompt_ids, plan.hooks or [], interventions=edits, should_stop=should_stop, on_stall=on_stall, **kwargs)
    elif batcher is None or not batcher.accepts(kit, plan.hooks or [], edits):
        pairs = create_generator_with_activations(kit, prompt_ids, plan.hooks or [], interventions=edits, should_stop=should_stop, **kwargs)
    capture_id = f"cap-{uuid.uuid4().hex}" if plan.hooks is not None else None

    try:
        try:
            if pairs is not None:
                row, first = None, next(pairs)
            else:
                assert batcher is not None
                row, first = batcher.open(kit, prompt_ids, plan.hooks or [], edits, should_stop, kwargs)
        except GenerationCancelled:
            raise Cancelled(during_prefill=True) from None
        except (HookSpecError, CaptureBudgetError):
            raise
        except ValueError as exc:  # the engine's own input checks (token ids out of range, ...)
            raise APIError(str(exc), param="prompt") from exc
        prompt_texts = [_token_text(kit, t) for t in prompt_ids]
        stream.emit(Started(prompt_ids, prompt_texts, capture_id, edited))
        cached = row.cached_tokens if row is not None else 0
        writer = _StepWriter(plan, prompt_ids, prompt_texts, capture_id, stream, store, edited, cached)
        if writer.push(*first):
            return None
        if row is not None:
            assert batcher is not None
            return partial(batcher.join, row, writer.push)
        assert pairs is not None
        for pair in pairs:
            if writer.push(*pair):
                return None
        writer.finish(None)
        return None
    finally:
        if pairs is not None:
            pairs.close()  # type: ignore[attr-defined]


class _StepWriter:
    """Turns each generated token into a Step event; the last one also stores the capture and emits Finished."""

    def __init__(
        self,
        plan: GenerationPlan,
        prompt_ids: list[int],
        prompt_texts: list[str],
        capture_id: Optional[str],
        stream: EventStream,
        store: CaptureStore,
        edited: Optional[list[dict[str, Any]]] = None,
        cached_tokens: int = 0,
    ) -> None:
        self.plan, self.prompt_ids, self.prompt_texts = plan, prompt_ids, prompt_texts
        self.capture_id, self.stream, self.store, self.edited = capture_id, stream, store, edited
        self.cached_tokens = cached_tokens
        kit = plan.model.kit
        tokens = plan.model.harmony_tokens
        self.harmony = _HarmonyText(kit.tokenizer.decode, tokens, plan.stop) if plan.harmony and tokens is not None else None
        self.captures: dict[str, list[Capture]] = {}
        self.totals = _Totals()

    def push(self, result: Any, acts: Any) -> bool:
        """Emit one token's Step; True once the generation is over (Finished emitted too)."""
        plan, kit = self.plan, self.plan.model.kit
        token_text = _token_text(kit, result.token)
        if self.harmony is not None:
            content, reasoning, route, finish = self.harmony.push(result)
        else:
            content, reasoning, route, finish = result.text, "", Route.CONTENT, result.finish_reason
        encoded = None
        if self.capture_id is not None:
            encoded = {hook: [encode_capture(c, plan.activation_format) for c in caps] for hook, caps in acts.items()}
            for hook, caps in acts.items():
                self.captures.setdefault(hook, []).extend(caps)
        totals = self.totals
        totals.generated_ids.append(result.token)
        totals.generated_text.append(token_text)
        totals.reasoning_tokens += route is Route.REASONING
        top = [TopAlternative(t.token, _token_text(kit, t.token), t.logprob) for t in result.top_logprobs]
        self.stream.emit(Step(result.token, token_text, content, reasoning, route, result.logprob, top, encoded))
        if finish is None:
            return False
        self.finish(finish)
        return True

    def finish(self, finish: Optional[str]) -> None:
        plan, totals, capture_id = self.plan, self.totals, self.capture_id
        stored_bytes = 0
        if capture_id is not None:
            metadata = {
                "capture_id": capture_id,
                "model": plan.model.model_id,
                "request_id": plan.request_id,
                "prompt_token_ids": json.dumps(self.prompt_ids),
                "generated_token_ids": json.dumps(totals.generated_ids),
                "prompt_tokens_text": json.dumps(self.prompt_texts),
                "generated_tokens_text": json.dumps(totals.generated_text),
            }
            if self.edited is not None:
                metadata["interventions"] = json.dumps(self.edited)
            blob = captures_to_safetensors(self.captures, metadata)
            if self.store.put(capture_id, plan.model.model_id, blob):
                stored_bytes = len(blob)
            else:
                log.warning("request %s: capture of %d bytes exceeds the store's bound; not kept", plan.request_id, len(blob))
                capture_id = None
        self.stream.emit(
            Finished(
                finish_reason=finish or "length",
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(totals.generated_ids),
                reasoning_tokens=totals.reasoning_tokens,
                capture_id=capture_id,
                capture_bytes=stored_bytes,
                cached_tokens=self.cached_tokens,
            )
        )
