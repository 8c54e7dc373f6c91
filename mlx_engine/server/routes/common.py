"""What the completion routes share: the hooks a capture request names, turning a chat or text request into a
plan, and answering whole or streamed. Chat and text completions, with activations or without, go through
the same plan and the same answer; only the prompt and the response's OpenAI shape differ."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional, Union

from flask import Response, jsonify

from ..errors import APIError, Redact, is_shutdown, to_error
from ...hooks.names import ResolvedHook
from ..intervention_sources import resolve_request_interventions
from ..jobs import GenerationPlan
from ..openai_format import (Collected, ResponseShape, chat_chunks, chat_completion, collect, completion_chunks, new_id,
                             text_completion)
from ..schemas.requests import (ActivationCompletionRequest, CaptureFields, ChatCompletionRequest, CompletionRequest,
                                SamplingFields)
from ..sse import SSE_DONE, SSE_HEADERS, ClientGone, sse_event
from ..state import request_id, state

log = logging.getLogger("mlx_engine.server")


def sse_response(chunks: Iterator[dict[str, Any]], rid: str, redact: Optional[Redact] = None) -> Response:
    """An SSE response that ends with [DONE], or with an error event if the job fails midway.

    A server shutting down ends every open stream with its error event and then [DONE], so
    a client waiting for [DONE] is not left hanging on a connection about to close.
    """
    def body() -> Iterator[bytes]:
        started_at = time.perf_counter()
        sent = 0
        outcome = "done"
        try:
            for chunk in chunks:
                yield sse_event(chunk)
                sent += 1
            yield SSE_DONE
        except ClientGone:
            outcome = "client disconnected"
        except GeneratorExit:
            outcome = "client disconnected"
            raise
        except Exception as exc:  # headers are gone; the error travels as an event
            outcome = "failed"
            yield sse_event((to_error(exc, rid, redact) if redact else to_error(exc, rid))[1])
            if is_shutdown(exc):
                outcome = "ended by the server's shutdown"
                yield SSE_DONE
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            log.info("request %s: stream %s after %d events in %.2fs", rid, outcome, sent, time.perf_counter() - started_at)

    return Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)


def capture_hooks(req: Union[ChatCompletionRequest, ActivationCompletionRequest]) -> list[ResolvedHook]:
    """The request's activation_hooks, resolved; without any, the hooks registered for its model; a 400 if neither."""
    model = state().registry.get(req.model)
    if req.activation_hooks:
        return model.resolve_hooks(req.activation_hooks)
    hooks = model.registered_hooks()
    if not hooks:
        raise APIError(
            "No activation_hooks in the request and none registered for this model; name hooks such as "
            "[{\"layer_name\": 0, \"component\": \"residual\"}] or register them with POST /v1/activations/hooks.",
            param="activation_hooks",
            code="no_hooks",
        )
    return hooks


def _plan(req: SamplingFields, hooks: Optional[list[ResolvedHook]], max_tokens: Optional[int], top_logprobs: int,
          **prompt: Any) -> GenerationPlan:
    """The engine's plan for a chat (`messages=`) or text (`prompt=`) request, with captures when `hooks` is given."""
    st = state()
    model = st.registry.get(req.model)
    return GenerationPlan(
        request_id=request_id(),
        model=model,
        **prompt,
        max_tokens=max_tokens or st.config.effective_default_max_tokens,
        max_tokens_given=max_tokens is not None,
        stop=req.stop_strings,
        **req.sampling,
        top_logprobs=top_logprobs,
        hooks=hooks,
        activation_format=req.activation_format if isinstance(req, CaptureFields) else "json",
        interventions=resolve_request_interventions(req.interventions, model, st.store),
    )


def _answer(req: SamplingFields, plan: GenerationPlan, shape: ResponseShape,
            chunks: Callable[[ResponseShape, Iterator[Any]], Iterator[dict[str, Any]]],
            whole: Callable[[ResponseShape, Collected], dict[str, Any]]) -> Response:
    """Run the plan, and answer as an event stream when the request asked for one, else as one JSON object."""
    st = state()
    events = st.generate(plan)
    if req.stream:
        return sse_response(chunks(shape, events), plan.request_id, st.redact)
    return jsonify(whole(shape, collect(events)))


def run_chat(req: ChatCompletionRequest, hooks: Optional[list[ResolvedHook]]) -> Response:
    """Answer a chat request, with activations when `hooks` (resolved) is not None."""
    plan = _plan(req, hooks, req.requested_max_tokens, (req.top_logprobs or 0) if req.logprobs else 0,
                 messages=[m.to_template() for m in req.messages])
    shape = ResponseShape(
        id=new_id("chatcmpl"),
        model=plan.model.model_id,
        logprobs=bool(req.logprobs),
        with_activations=hooks is not None,
        include_usage=req.include_usage,
        harmony=plan.harmony,
    )
    return _answer(req, plan, shape, chat_chunks, chat_completion)


def run_completion(req: CompletionRequest, hooks: Optional[list[ResolvedHook]]) -> Response:
    """Answer a text completion (the raw prompt, no chat template), with activations when `hooks` is not None."""
    plan = _plan(req, hooks, req.max_tokens, req.logprobs or 0, prompt=req.prompt_value)
    shape = ResponseShape(
        id=new_id("cmpl"),
        model=plan.model.model_id,
        logprobs=req.logprobs is not None,
        with_activations=hooks is not None,
        include_usage=req.include_usage,
    )
    return _answer(req, plan, shape, completion_chunks, text_completion)
