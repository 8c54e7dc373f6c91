"""Steering vectors over HTTP: the difference of mean activations between two sets of prompts."""

from __future__ import annotations

from functools import partial
from typing import Any

from flask import Blueprint, Response, jsonify

from ...hooks.capture import mlx_to_numpy
from ...interventions.spec import InterventionError
from ...interventions.steering import steering_vector
from ...loading import tokenize
from ...wire.codec import encode_array
from ..errors import APIError
from ..loaded_models import LoadedModel
from ..openapi import operation
from ..schemas.requests import SteeringVectorRequest
from ..schemas.responses import SteeringVectorResponse
from ..state import parse_body, state

bp = Blueprint("steering", __name__)
TAGS = ("Interventions",)
# steering_vector names the layer argument `layer`; the request calls it `layer_name`.
_PARAMS = {"layer": "layer_name"}


def _check_token_ids(req: SteeringVectorRequest, vocab_size: int) -> None:
    """A forward pass would read any embedding row it is given, so ids are checked first."""
    for name in ("positive", "negative"):
        for i, prompt in enumerate(getattr(req, name)):
            bad = [t for t in prompt if t >= vocab_size] if isinstance(prompt, list) else []
            if bad:
                raise APIError(
                    f"{name}[{i}]: token ids out of range [0, {vocab_size}): {bad[:5]}.", param=f"{name}[{i}]", code="invalid_value"
                )


def check_prompt_lengths(model: LoadedModel, req: SteeringVectorRequest) -> None:
    """Before queueing: each prompt is one forward pass, so each must fit the context (texts by a lower bound)."""
    for name in ("positive", "negative"):
        for i, prompt in enumerate(getattr(req, name)):
            if isinstance(prompt, str):
                model.limits.check_texts([prompt], 0, f"{name}[{i}]")
            else:
                model.limits.check(len(prompt), 0, f"{name}[{i}]")


def _tokenized(model: LoadedModel, req: SteeringVectorRequest, name: str) -> list[list[int]]:
    """The prompts as token ids, each checked exactly against the context."""
    out = []
    for i, prompt in enumerate(getattr(req, name)):
        tokens = tokenize(model.kit, prompt) if isinstance(prompt, str) else list(prompt)
        model.limits.check(len(tokens), 0, f"{name}[{i}]")
        out.append(tokens)
    return out


def build_steering_vector(model: LoadedModel, req: SteeringVectorRequest) -> dict[str, Any]:
    """The engine-thread job: run the prompts, subtract the means, encode. Returns plain JSON data."""
    kit = model.kit
    _check_token_ids(req, kit.arch_info.vocab_size)
    positive, negative = _tokenized(model, req, "positive"), _tokenized(model, req, "negative")
    try:
        sv = steering_vector(
            kit,
            positive,
            negative,
            req.layer_name,
            component=req.component,
            capture_input=req.capture_input,
            last_token_only=req.position == "last",
            drop_bos=req.drop_bos,
        )
    except InterventionError as exc:
        raise APIError(str(exc), param=_PARAMS.get(exc.param, exc.param), code="invalid_hook") from None
    except ValueError as exc:  # a prompt with no tokens
        raise APIError(str(exc), param=None, code="invalid_value") from None
    raw, dtype = mlx_to_numpy(sv.vector)
    wire = encode_array(raw, req.format, dtype)
    vector = {"shape": wire["shape"], "dtype": wire["dtype"], "encoding": req.format, "data": wire["data"]}
    return {
        "object": "steering_vector",
        "model": model.model_id,
        "hook_id": sv.hook_id,
        "layer_name": sv.layer_name,
        "layer": sv.layer,
        "component": sv.component,
        "capture_input": sv.capture_input,
        "position": req.position,
        "drop_bos": req.drop_bos,
        "n_positive": sv.n_positive,
        "n_negative": sv.n_negative,
        "norm": sv.norm,
        "vector": vector,
        "intervention": {
            "layer_name": sv.layer_name,
            "component": sv.component,
            "capture_input": sv.capture_input,
            "op": "add",
            "vector": vector,
            "scale": 1.0,
            "positions": "all",
        },
    }


@bp.post("/v1/steering/vectors")
@operation(
    summary="Build a steering vector from contrasting prompts",
    tags=TAGS,
    request=SteeringVectorRequest,
    response=SteeringVectorResponse,
    description="The mean activation of `positive` prompts minus that of `negative` prompts at one hook "
    "point (a [d_model] tensor: residual by default), each prompt counted once whatever its length. The "
    "response's `intervention` adds it back where it was measured: send it in `interventions` with a `scale`.",
)
def steering_vectors() -> Response:
    req = parse_body(SteeringVectorRequest)
    st = state()
    model = st.registry.get(req.model)
    check_prompt_lengths(model, req)
    return jsonify(st.engine.call(partial(build_steering_vector, model, req)))
