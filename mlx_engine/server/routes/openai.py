"""The OpenAI-compatible routes: models, chat completions, text completions."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..openapi import operation
from ..schemas.requests import ChatCompletionRequest, CompletionRequest
from ..schemas.responses import ChatCompletion, ChatCompletionChunk, Completion, ModelList, ModelObject
from ..state import parse_body, state
from .common import run_chat, run_completion

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
    return run_completion(parse_body(CompletionRequest), None)
