"""Corpus extraction over HTTP: start a job that writes an activation store, follow it, cancel it.

A job writes only a new folder under the server's --store-root (named by the server, never
by the request), with the documents given inline; the server reads no other path for it.
The store is the one `mlx-engine extract` writes (store/layout.md), readable with
`mlx_engine.ActivationStore.open`; how a job shares the engine with chat requests is in
server/extract_jobs.py.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal, Optional

from flask import Blueprint, Response, jsonify
from flask.blueprints import BlueprintSetupState
from pydantic import BaseModel, Field

from ...store.errors import StoreError
from ...store.extract import start_extraction
from ...store.recorder import storable
from ..errors import APIError
from ..extract_jobs import ExtractJob, ExtractJobs, new_store_name
from ..openapi import operation
from ..schemas.common import StrictModel
from ..schemas.hooks_and_edits import HookList_
from ..state import parse_body, state

bp = Blueprint("extract", __name__)
TAGS = ("Extraction",)
JOBS_KEY = "mlx_engine.extract_jobs"
MAX_DOCUMENTS = 100_000
CANCEL_WAIT_S = 30.0  # DELETE waits for the batch in flight to end (one forward pass)


@bp.record_once
def _attach(setup: BlueprintSetupState) -> None:
    setup.app.extensions[JOBS_KEY] = ExtractJobs()


def _jobs() -> ExtractJobs:
    from flask import current_app

    return current_app.extensions[JOBS_KEY]


class ExtractRequest(StrictModel):
    """POST /v1/extract: the documents inline, the hooks, and `mlx-engine extract`'s options."""

    model: Optional[str] = Field(default=None, description="A loaded model's id (default: the only one loaded).")
    documents: list[str] = Field(min_length=1, max_length=MAX_DOCUMENTS, description="The corpus: one string per document.")
    hooks: HookList_ = Field(description="Hooks to store, as activation_hooks names them (with `indices` for neuron subsets).")
    context_size: int = Field(default=1024, ge=1, le=1 << 20, description="Tokens per window; longer documents are split.")
    batch_size: int = Field(default=8, ge=1, le=256, description="Windows per forward pass (right-padded).")
    max_tokens: Optional[int] = Field(default=None, ge=1, description="Stop after this many tokens.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    packed: bool = Field(default=False, description="Pack documents into full windows without document masks (SAELens style).")
    shard_tokens: Optional[int] = Field(default=None, ge=1, description="Rows per shard (default: about 256 MiB per shard).")
    top_k: int = Field(default=20, ge=1, le=1000, description="Top examples kept per neuron.")
    active_threshold: float = Field(default=0.0, description="A neuron is active where its value exceeds this.")


class ExtractJobResponse(BaseModel):
    id: str
    object: Literal["extract.job"]
    model: str
    state: Literal["running", "completed", "cancelled", "failed"]
    store: str = Field(description="The store's folder under the server's --store-root.")
    created: int
    documents_total: int
    documents_done: int
    tokens_done: int
    tokens_per_second: Optional[float]
    eta_seconds: Optional[float]
    shards: int
    error: Optional[str]


class ExtractJobList(BaseModel):
    object: Literal["list"]
    data: list[ExtractJobResponse]


def _job(job_id: str) -> ExtractJob:
    job = _jobs().get(job_id)
    if job is None:
        raise APIError(f"No extraction job {job_id!r}; GET /v1/extract lists them.", status=404, type="not_found_error",
                       param="id", code="extract_job_not_found")
    return job


def _check_hooks(kit: Any, hooks: list[Any]) -> None:
    try:
        storable(kit.arch_info, hooks)
    except StoreError as exc:
        raise APIError(str(exc), param="hooks", code="invalid_hook") from None


@bp.post("/v1/extract")
@operation(
    summary="Start an extraction job",
    tags=TAGS,
    request=ExtractRequest,
    response=ExtractJobResponse,
    description="Runs the model over `documents` and writes every row of `hooks`, with online statistics, to a new "
    "activation store under the server's --store-root (403 when the server has none). Answers once the store is "
    "created; the job then runs one batch at a time between other requests. Follow it at GET /v1/extract/{id}.",
)
def start() -> Response:
    root = state().config.store_root
    if root is None:
        raise APIError("This server writes no activation stores: start it with --store-root DIR to allow POST /v1/extract.",
                       status=403, type="permission_error", code="store_root_not_configured")
    req = parse_body(ExtractRequest)
    model = state().registry.get(req.model)
    _check_hooks(model.kit, model.resolve_hooks(list(req.hooks)))
    name = new_store_name()
    out = root.expanduser() / name
    options = req.model_dump(exclude={"model", "documents", "hooks"})
    begin = partial(start_extraction, model.kit, list(req.documents), list(req.hooks), out, **options)
    try:
        job = _jobs().start(state().engine, model.model_id, name, out, begin)
    except StoreError as exc:
        raise APIError(str(exc), param="documents", code="invalid_extraction") from None
    response = jsonify(job.to_json())
    response.headers["Location"] = f"/v1/extract/{job.id}"
    return response


@bp.get("/v1/extract")
@operation(summary="List extraction jobs", tags=TAGS, response=ExtractJobList)
def list_jobs() -> Response:
    return jsonify({"object": "list", "data": [j.to_json() for j in _jobs().list()]})


@bp.get("/v1/extract/<job_id>")
@operation(summary="An extraction job's progress", tags=TAGS, response=ExtractJobResponse,
           path_params={"job_id": "The id POST /v1/extract returned."},
           description="`state` (running, completed, cancelled, failed), documents and tokens done, tokens/s, ETA.")
def get_job(job_id: str) -> Response:
    return jsonify(_job(job_id).to_json())


@bp.delete("/v1/extract/<job_id>")
@operation(summary="Cancel an extraction job", tags=TAGS, response=ExtractJobResponse,
           path_params={"job_id": "The id POST /v1/extract returned."},
           description="Stops after the batch in flight. The store keeps its committed shards, stays marked incomplete, "
           "and resumes with `mlx-engine extract` given the same documents, hooks and options.")
def cancel_job(job_id: str) -> Response:
    job = _job(job_id)
    _jobs().cancel(job, CANCEL_WAIT_S)
    return jsonify(job.to_json())
