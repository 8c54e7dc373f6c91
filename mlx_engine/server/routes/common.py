"""What the completion routes share: turning a request into a plan, and answering whole or streamed."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Optional

from flask import Response, jsonify

from ..errors import Redact, is_shutdown, to_error
from ...hooks.names import ResolvedHook
from ..intervention_sources import resolve_request_interventions
from ..jobs import GenerationPlan
from ..openai_format import ResponseShape, chat_chunks, chat_completion, collect, new_id
from ..schemas.requests import ChatCompletionRequest
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


def run_chat(req: ChatCompletionRequest, hooks: Optional[list[ResolvedHook]]) -> Response:
    """Answer a chat request, with activations when `hooks` (resolved) is not None."""
    st = state()
    model = st.registry.get(req.model)
    plan = GenerationPlan(
        request_id=request_id(),
        model=model,
        messages=[m.to_template() for m in req.messages],
        max_tokens=req.requested_max_tokens or st.config.effective_default_max_tokens,
        max_tokens_given=req.requested_max_tokens is not None,
        stop=req.stop_strings,
        **req.sampling,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
        hooks=hooks,
        activation_format=req.activation_format,
        interventions=resolve_request_interventions(req.interventions, model, st.store),
    )
    shape = ResponseShape(
        id=new_id("chatcmpl"),
        model=model.model_id,
        logprobs=bool(req.logprobs),
        with_activations=hooks is not None,
        include_usage=req.include_usage,
        harmony=plan.harmony,
    )
    events = st.generate(plan)
    if req.stream:
        return sse_response(chat_chunks(shape, events), plan.request_id, st.redact)
    return jsonify(chat_completion(shape, collect(events)))
