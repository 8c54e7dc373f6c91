"""Analyses on a loaded model over HTTP: logit lens, direct logit attribution, head scores, patching.

Each request is one engine-thread job (the same queue as generation: MLX work stays on the
engine thread) that calls the Python function of mlx_engine.analysis and answers its
`to_json()`, so HTTP and Python give the same numbers. The work one request may ask for is
bounded before anything runs: prompts of at most MAX_TOKENS tokens (and the server's
--max-prompt-tokens), at most MAX_RUNS forward passes for a patching grid or head
ablations; beyond that the answer is a 400 naming the limit.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Union

from flask import Blueprint, Response, jsonify

from ...analysis.attribution import default_target_foil, direct_logit_attribution
from ...analysis.common import AnalysisError, check_heads, check_layers, prompt_tokens
from ...analysis.heads import head_scores
from ...analysis.lens import logit_lens
from ...analysis.patching import activation_patching, prepare_patching
from ...hooks.names import HookSpecError
from ..errors import APIError
from ..loaded_models import LoadedModel
from ..openapi import operation
from ..schemas.research import (AttributionRequest, AttributionResponse, HeadScoresResponse, HeadsRequest, LogitLensRequest,
                                LogitLensResponse, PatchingRequest, PatchingResponse)
from ..state import parse_body, state
from .json_values import finite

bp = Blueprint("analysis", __name__)
TAGS = ("Analysis",)
MAX_TOKENS = 512  # prompt tokens per analysis request
MAX_RUNS = 1024  # forward passes per request: patching grid cells, head ablations


def _tokens(model: LoadedModel, prompt: Union[str, list[int]], param: str) -> list[int]:
    """A prompt's ids (checked against the vocabulary), refused beyond MAX_TOKENS or the server's prompt limit."""
    try:
        tokens = prompt_tokens(model.kit, prompt)
    except AnalysisError as exc:
        raise APIError(str(exc), param=param, code="invalid_value") from None
    if len(tokens) > MAX_TOKENS:
        raise APIError(f"{param} has {len(tokens)} tokens; an analysis request takes at most {MAX_TOKENS}.", param=param,
                       code="analysis_too_large")
    model.limits.check(len(tokens), 0, param)
    return tokens


def _runs(count: int, what: str, param: str) -> None:
    if count > MAX_RUNS:
        raise APIError(f"{what} needs {count} forward passes; a request may run at most {MAX_RUNS}: narrow it ({param}).",
                       param=param, code="analysis_too_large")


def _answer(model_id: Optional[str], kind: str, job: Callable[[LoadedModel], dict[str, Any]]) -> Response:
    """Run `job` on the engine thread; analysis errors become 400s naming what to change."""
    st = state()
    model = st.registry.get(model_id)

    def run() -> dict[str, Any]:
        try:
            return job(model)
        except (AnalysisError, HookSpecError) as exc:
            raise APIError(str(exc), param=None, code="invalid_analysis") from None

    result = st.engine.call(run)
    return jsonify({"object": f"analysis.{kind}", "model": model.model_id, **finite(result)})


def lens_job(req: LogitLensRequest, model: LoadedModel) -> dict[str, Any]:
    return logit_lens(model.kit, _tokens(model, req.prompt, "prompt"), top_k=req.top_k).to_json()


def attribution_job(req: AttributionRequest, model: LoadedModel) -> dict[str, Any]:
    tokens = _tokens(model, req.prompt, "prompt")
    target, foil = req.target, req.foil
    if target is None or foil is None:
        top, second = default_target_foil(model.kit, tokens, req.position)
        target = top if target is None else target
        foil = second if foil is None else foil
    return direct_logit_attribution(model.kit, tokens, target, foil, position=req.position).to_json()


def heads_job(req: HeadsRequest, model: LoadedModel) -> dict[str, Any]:
    tokens = None if req.prompt is None else _tokens(model, req.prompt, "prompt")
    info = model.kit.arch_info
    if req.importance:
        if tokens is None:
            raise APIError("importance ablates heads on a text: give prompt.", param="prompt", code="invalid_value")
        _runs(2 * info.num_layers * info.n_heads, "head importance (zero and mean ablation of every head)", "importance")
    model.limits.check(2 * req.repeat_length + 1, 0, "repeat_length")
    return head_scores(model.kit, tokens, repeat_length=req.repeat_length, seed=req.seed, importance=req.importance,
                       progress=False).to_json()


def patching_job(req: PatchingRequest, model: LoadedModel) -> dict[str, Any]:
    kit = model.kit
    clean = _tokens(model, req.clean, "clean")
    corrupted = None if req.corrupted is None else _tokens(model, req.corrupted, "corrupted")
    rows = len(check_layers(kit, req.layers))
    if req.component == "z":
        columns = len(check_heads(kit, req.heads))
    else:
        columns = len(clean) if req.positions is None else len(set(req.positions))
    _runs(rows * columns, f"a {rows} x {columns} patching grid", "layers, positions or heads")
    setup = prepare_patching(kit, clean, corrupted, target=req.target, foil=req.foil, metric=req.metric, position=req.position,
                             noise_positions=req.noise_positions, seed=req.seed, components=(req.component,))
    return activation_patching(setup, req.component, layers=req.layers, positions=req.positions, heads=req.heads,
                               progress=False).to_json()


@bp.post("/v1/analysis/logit_lens")
@operation(summary="Logit lens: every layer's residual decoded by the final norm and head", tags=TAGS,
           request=LogitLensRequest, response=LogitLensResponse,
           description="mlx_engine.analysis.logit_lens(kit, prompt, top_k).to_json(): per row (embedding, then each layer) "
           "and position the top tokens and probabilities, the next token's rank and probability, KL to the final layer.")
def lens() -> Response:
    req = parse_body(LogitLensRequest)
    return _answer(req.model, "logit_lens", partial(lens_job, req))


@bp.post("/v1/analysis/attribution")
@operation(summary="Direct logit attribution of logit(target) - logit(foil)", tags=TAGS, request=AttributionRequest,
           response=AttributionResponse,
           description="mlx_engine.analysis.direct_logit_attribution(kit, prompt, target, foil, position).to_json(): the "
           "embedding's, each layer's attention and MLP (and each head's, where heads split) share of the difference. "
           "target and foil default to the model's two most likely tokens at the position.")
def attribution() -> Response:
    req = parse_body(AttributionRequest)
    return _answer(req.model, "attribution", partial(attribution_job, req))


@bp.post("/v1/analysis/heads")
@operation(summary="Attention head scores: induction, duplicate, previous-token, entropy, importance", tags=TAGS,
           request=HeadsRequest, response=HeadScoresResponse,
           description="mlx_engine.analysis.head_scores(kit, prompt, repeat_length, seed, importance).to_json(). "
           f"importance (2 x layers x heads ablation passes) is refused above {MAX_RUNS} passes.")
def heads() -> Response:
    req = parse_body(HeadsRequest)
    return _answer(req.model, "heads", partial(heads_job, req))


@bp.post("/v1/analysis/patching")
@operation(summary="Activation patching (causal tracing) over layers and positions or heads", tags=TAGS,
           request=PatchingRequest, response=PatchingResponse,
           description="prepare_patching(kit, clean, corrupted | noise_positions, ...) then activation_patching(setup, "
           f"component, layers, positions, heads).to_json(): the recovered fraction per site. At most {MAX_RUNS} grid "
           f"cells and {MAX_TOKENS} tokens per prompt.")
def patching() -> Response:
    req = parse_body(PatchingRequest)
    return _answer(req.model, "patching", partial(patching_job, req))
