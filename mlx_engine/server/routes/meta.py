"""Service routes: health and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from ..batching import Batcher
from ..openapi import build_openapi, operation
from ..schemas.responses import HealthResponse
from ..state import state

bp = Blueprint("meta", __name__)
TAGS = ("Service",)


@bp.get("/health")
@operation(summary="Liveness, loaded models, engine queue and capture store", tags=TAGS, response=HealthResponse)
def health() -> Response:
    st = state()
    engine = st.engine
    return jsonify(
        {
            "status": "shutting_down" if st.stopping.is_set() else "ok" if engine.alive else "degraded",
            "models": st.registry.ids(),
            "engine": {
                "alive": engine.alive,
                "busy": engine.busy,
                "queue_depth": engine.queue_depth,
                "completed_generations": engine.stats.completed_generations,
                "cancelled_generations": engine.stats.cancelled_generations,
                "cancelled_in_prefill": engine.stats.cancelled_in_prefill,
                "failed_generations": engine.stats.failed_generations,
            },
            "capture_store": {
                "items": len(st.store),
                "bytes": st.store.total_bytes,
                "max_items": st.store.max_items,
                "max_bytes": st.store.max_bytes,
            },
            "batching": batching_status(engine.batcher),
        }
    )


def batching_status(batcher: Batcher) -> dict[str, Any]:
    stats, prefix = batcher.stats, batcher.prefix
    cache = None
    if prefix is not None:
        cache = {
            "entries": len(prefix),
            "bytes": prefix.total_bytes,
            "max_bytes": prefix.max_bytes,
            "hits": prefix.stats.hits,
            "cached_tokens": prefix.stats.cached_tokens,
        }
    return {
        "max_batch_size": batcher.max_batch_size,
        "rows": batcher.rows,
        "largest_batch": stats.largest_batch,
        "decode_steps": stats.decode_steps,
        "batched_steps": stats.batched_steps,
        "solo_generations": stats.solo_generations,
        "prompt_cache": cache,
    }


@bp.get("/openapi.json")
@operation(summary="This API as an OpenAPI 3.1 document", tags=TAGS)
def openapi() -> Response:
    return jsonify(build_openapi(current_app, state().config))
