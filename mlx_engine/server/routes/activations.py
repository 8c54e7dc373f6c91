"""Activation capture: chat and text completions with activations, registered hooks, stored captures."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..errors import APIError
from ..openapi import operation
from ..schemas.requests import ActivationChatRequest, ActivationCompletionRequest, HookQuery, HookRegistrationRequest
from ..schemas.responses import (ActivationCompletion, ActivationCompletionChunk, CaptureListResponse, ChatCompletion,
                                 ChatCompletionChunk, HookListResponse)
from ..state import parse_body, parse_query, state
from .common import capture_hooks, run_chat, run_completion

bp = Blueprint("activations", __name__)
TAGS = ("Activations",)


@bp.post("/v1/chat/completions/with_activations")
@operation(
    summary="Chat completion with activations",
    tags=TAGS,
    request=ActivationChatRequest,
    response=ChatCompletion,
    stream=ChatCompletionChunk,
    description="A chat completion that also returns the activations of `activation_hooks` (or, when the "
    "request names none, of the hooks registered for the model): grouped by hook id in step order, or per "
    "step in each streamed chunk. The whole capture is kept for download under `capture_id`, and "
    "`interventions` of later requests can read it by that id (mean, patch). With `interventions` in "
    "the same request the captures show the edited model; a hook at an edited point says `edit`.",
)
def chat_with_activations() -> Response:
    req = parse_body(ActivationChatRequest)
    return run_chat(req, capture_hooks(req))


@bp.post("/v1/completions/with_activations")
@operation(
    summary="Text completion with activations",
    tags=TAGS,
    request=ActivationCompletionRequest,
    response=ActivationCompletion,
    stream=ActivationCompletionChunk,
    description="A text completion of the raw `prompt` (text, tokenized without a chat template, or token ids) "
    "that also returns activations, as /v1/chat/completions/with_activations does for chat: the hooks of "
    "`activation_hooks` (or the registered ones), `activation_format`, `interventions` (SAE features named by "
    "`sae`), whole or streamed. OpenAI's text_completion object, plus `capture_id`, `activations` (by hook id, "
    "in step order), `prompt_token_ids`, `prompt_tokens_text`, `generated_token_ids`, `generated_tokens_text`; "
    "streamed, the first chunk names the capture and the prompt's tokens, and each token's chunk carries "
    "`token_id`, `token_text` and that step's `activations`.",
)
def completion_with_activations() -> Response:
    req = parse_body(ActivationCompletionRequest)
    return run_completion(req, capture_hooks(req))


def _hook_list(model_id: str, hooks: list[dict]) -> Response:
    return jsonify({"object": "list", "model": model_id, "data": hooks})


@bp.post("/v1/activations/hooks")
@operation(summary="Register hooks for later requests", tags=TAGS, request=HookRegistrationRequest, response=HookListResponse)
def register_hooks() -> Response:
    req = parse_body(HookRegistrationRequest)
    model = state().registry.get(req.model)
    return _hook_list(model.model_id, model.register_hooks(req.hooks))


@bp.get("/v1/activations/hooks")
@operation(summary="List registered hooks", tags=TAGS, query=HookQuery, response=HookListResponse)
def list_hooks() -> Response:
    query = parse_query(HookQuery)
    model = state().registry.get(query.model)
    return _hook_list(model.model_id, model.list_hooks())


@bp.delete("/v1/activations/hooks")
@operation(summary="Remove one registered hook (hook_id) or all of them", tags=TAGS, query=HookQuery, response=HookListResponse)
def delete_hooks() -> Response:
    query = parse_query(HookQuery)
    model = state().registry.get(query.model)
    return _hook_list(model.model_id, model.unregister_hooks(query.hook_id))


@bp.get("/v1/activations/captures")
@operation(summary="List stored captures", tags=TAGS, response=CaptureListResponse)
def list_captures() -> Response:
    items = state().store.list()
    return jsonify(
        {
            "object": "list",
            "data": [{"capture_id": c.capture_id, "model": c.model, "bytes": c.size, "created": c.created} for c in items],
        }
    )


def _missing_capture(capture_id: str) -> APIError:
    return APIError(
        f"No stored capture {capture_id!r}: it never existed, is still being generated, or was evicted "
        "(the store keeps the most recent captures within its count and byte bounds).",
        status=404,
        type="not_found_error",
        param="capture_id",
        code="capture_not_found",
    )


@bp.get("/v1/activations/captures/<capture_id>")
@operation(
    summary="Download a whole capture as safetensors",
    tags=TAGS,
    binary="application/octet-stream",
    path_params={"capture_id": "The capture_id a response named."},
    description="Tensor `{hook_id}/step{step:06d}/chunk{i:04d}` per hook, step and prefill chunk (zero-padded: names sort in step order); each tensor's wire "
    "metadata is a JSON string in the header, and `__metadata__` holds the request's token ids and strings.",
)
def get_capture(capture_id: str) -> Response:
    item = state().store.get(capture_id)
    if item is None:
        raise _missing_capture(capture_id)
    return Response(
        item.data,
        mimetype="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{item.capture_id}.safetensors"'},
    )


@bp.delete("/v1/activations/captures/<capture_id>")
@operation(summary="Delete a stored capture", tags=TAGS, path_params={"capture_id": "A stored capture id."})
def delete_capture(capture_id: str) -> Response:
    if not state().store.delete(capture_id):
        raise _missing_capture(capture_id)
    return jsonify({"id": capture_id, "object": "capture", "deleted": True})
