"""Model management: load (from a model root or the Hub), unload, hook points."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..openapi import operation
from ..loaded_models import resolve_load_request
from ..parallel import refusal
from ..schemas.requests import ModelLoadRequest, ModelUnloadRequest
from ..schemas.responses import HookPointsResponse, ModelDeleted, ModelObject
from ..state import parse_body, state

bp = Blueprint("models", __name__)
TAGS = ("Models",)


@bp.post("/v1/models/load")
@operation(summary="Load a model", tags=TAGS, request=ModelLoadRequest, response=ModelObject)
def load() -> Response:
    req = parse_body(ModelLoadRequest)
    st = state()
    if st.leader is not None and st.registry.find(req.model) is None:
        raise refusal(st, "Loading another model")  # the other ranks hold parts of the served model only
    target, model_id = resolve_load_request(req.model, st.config.model_roots, st.config.allow_hub_models)
    existing = st.registry.find(model_id)
    loaded = existing if existing is not None else st.load(target, model_id)
    return jsonify(loaded.describe())


@bp.post("/v1/models/unload")
@operation(summary="Unload a model", tags=TAGS, request=ModelUnloadRequest, response=ModelDeleted)
def unload() -> Response:
    req = parse_body(ModelUnloadRequest)
    st = state()
    if st.leader is not None:
        raise refusal(st, "Unloading the model")
    st.registry.get(req.model)  # 404 before queueing behind running generations
    st.unload(req.model)
    return jsonify({"id": req.model, "object": "model", "deleted": True})


@bp.get("/v1/models/<model:model_id>/hook_points")
@operation(
    summary="Every hook point of a model: layers, components, shapes, aliases",
    tags=TAGS,
    response=HookPointsResponse,
    path_params={"model_id": "A loaded model id."},
)
def hook_points(model_id: str) -> Response:
    return jsonify(state().registry.get(model_id, param="model_id").hook_listing)
