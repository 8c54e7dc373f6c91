"""Activation capture: chat with activations, registered hooks, stored captures."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..errors import APIError
from ..openapi import operation
from ..schemas.requests import ActivationChatRequest, HookQuery, HookRegistrationRequest
from ..schemas.responses import CaptureListResponse, ChatCompletion, ChatCompletionChunk, HookListResponse
from ..state import parse_body, parse_query, state
from .common import run_chat

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
    model = state().registry.get(req.model)
    if req.activation_hooks:
        hooks = model.resolve_hooks(req.activation_hooks)
    else:
        hooks = model.registered_hooks()
        if not hooks:
            raise APIError(
                "No activation_hooks in the request and none registered for this model; name hooks such as "
                "[{\"layer_name\": 0, \"component\": \"residual\"}] or register them with POST /v1/activations/hooks.",
                param="activation_hooks",
                code="no_hooks",
            )
    return run_chat(req, hooks)


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
