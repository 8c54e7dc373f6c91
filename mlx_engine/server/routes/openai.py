"""The OpenAI-compatible routes: models, chat completions, text completions."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..intervention_sources import resolve_request_interventions
from ..jobs import GenerationPlan
from ..openai_format import ResponseShape, collect, completion_chunks, new_id, text_completion
from ..openapi import operation
from ..schemas.requests import ChatCompletionRequest, CompletionRequest
from ..schemas.responses import ChatCompletion, ChatCompletionChunk, Completion, ModelList, ModelObject
from ..state import parse_body, request_id, state
from .common import run_chat, sse_response

bp = Blueprint("openai", __name__)
TAGS = ("OpenAI-compatible",)


@bp.get("/v1/models")
@operation(summary="List loaded models", tags=TAGS, response=ModelList)
def list_models() -> Response:
    return jsonify({"object": "list", "data": [m.describe() for m in state().registry.all()]})


@bp.get("/v1/models/<model:model_id>")
@operation(summary="Describe a loaded model", tags=TAGS, response=ModelObject, path_params={"model_id": "A loaded model id."})
def retrieve_model(model_id: str) -> Response:
    return jsonify(state().registry.get(model_id, param="model_id").describe())


@bp.post("/v1/chat/completions")
@operation(
    summary="Chat completion",
    tags=TAGS,
    request=ChatCompletionRequest,
    response=ChatCompletion,
    stream=ChatCompletionChunk,
    description="OpenAI's chat completion. `activation_hooks` (the SDK's extra_body) adds activations "
    "as in /v1/chat/completions/with_activations; `interventions` edit the model while it generates.",
)
def chat_completions() -> Response:
    req = parse_body(ChatCompletionRequest)
    hooks = state().registry.get(req.model).resolve_hooks(req.activation_hooks) if req.activation_hooks else None
    return run_chat(req, hooks)


@bp.post("/v1/completions")
@operation(
    summary="Text completion",
    tags=TAGS,
    request=CompletionRequest,
    response=Completion,
    stream=Completion,
    description="OpenAI's text completion; `interventions` edit the model while it generates.",
)
def completions() -> Response:
    req = parse_body(CompletionRequest)
    st = state()
    model = st.registry.get(req.model)
    plan = GenerationPlan(
        request_id=request_id(),
        model=model,
        prompt=req.prompt_value,
        max_tokens=req.max_tokens or st.config.effective_default_max_tokens,
        max_tokens_given=req.max_tokens is not None,
        stop=req.stop_strings,
        **req.sampling,
        top_logprobs=req.logprobs or 0,
        interventions=resolve_request_interventions(req.interventions, model, st.store),
    )
    shape = ResponseShape(
        id=new_id("cmpl"),
        model=model.model_id,
        logprobs=req.logprobs is not None,
        include_usage=req.include_usage,
    )
    events = st.generate(plan)
    if req.stream:
        return sse_response(completion_chunks(shape, events), plan.request_id, st.redact)
    return jsonify(text_completion(shape, collect(events)))
