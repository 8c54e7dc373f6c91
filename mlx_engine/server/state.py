"""What the routes share: configuration, the engine thread, loaded models, stored captures,
the shutdown flag and the error redactor."""

from __future__ import annotations

import gc
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional, TypeVar

from flask import current_app, g, request
from pydantic import BaseModel

from ..loading import load_model
from .batching import Batcher
from .capture_store import CaptureStore
from .config import ServerConfig
from .engine import EngineThread
from .jobs import GenerationPlan, run_generation
from .loaded_models import LoadedModel, ModelRegistry
from .redact import Redactor
from .sse import read_events, started

M = TypeVar("M", bound=BaseModel)
EXTENSION_KEY = "mlx_engine"


@dataclass
class ServerState:
    config: ServerConfig
    engine: EngineThread
    registry: ModelRegistry
    store: CaptureStore
    redact: Redactor
    # Set on SIGINT/SIGTERM: readers end their streams, new requests get 503 (shutdown.py).
    stopping: threading.Event = field(default_factory=threading.Event)
    # A model-parallel job's rank-0 Leader (distributed/serve.py; server/parallel.py sets it): generations run through it.
    leader: Optional[Any] = None

    @classmethod
    def create(cls, config: ServerConfig) -> "ServerState":
        return cls(
            config=config,
            engine=EngineThread(batcher=Batcher(config.max_batch_size, config.prompt_cache_bytes)),
            registry=ModelRegistry(),
            store=CaptureStore(config.capture_store_items, config.capture_store_bytes),
            redact=Redactor(config.model_roots),
        )

    # -- model lifecycle, run on the engine thread
    def load(self, target: str, model_id: Optional[str] = None) -> LoadedModel:
        def job() -> LoadedModel:
            # Checked again here, in queue order: two requests for one model load it once.
            if model_id is not None and (already := self.registry.find(model_id)) is not None:
                return already
            kit = load_model(target, parallel=self.config.parallel)
            served_id = model_id or kit.model_id
            existing = self.registry.find(served_id)
            if existing is not None:
                return existing
            loaded = LoadedModel.build(served_id, kit, target, self.config.max_prompt_tokens)
            self.registry.add(loaded)
            return loaded

        return self.engine.call(job)

    def unload(self, model_id: str) -> None:
        def job() -> None:
            import mlx.core as mx

            self.registry.remove(model_id)
            gc.collect()
            mx.clear_cache()

        self.engine.call(job)

    def generate(self, plan: GenerationPlan) -> Generator[Any, None, None]:
        """Queue a generation; return its events once the first one is in.

        Waiting for the first event means every error found before generating (bad
        hooks, capture budget, prompt problems) still becomes a proper HTTP status. A
        prompt that cannot fit the context is refused before it is queued at all.
        """
        plan.check_length()
        budget = self.config.capture_budget_bytes if self.config.capture_budget_mb > 0 else None
        job = partial(run_generation, plan, store=self.store, budget_bytes=budget, batcher=self.engine.batcher, leader=self.leader)
        stream = self.engine.stream(plan.request_id, job)
        disconnected = request.environ.get("waitress.client_disconnected")
        return started(read_events(stream, disconnected, self.stopping.is_set))


def state() -> ServerState:
    return current_app.extensions[EXTENSION_KEY]


def parse_body(model: type[M]) -> M:
    """Validate the JSON body against `model` (strict; the server's limits in context)."""
    return model.model_validate_json(
        request.get_data(cache=True) or b"", context={"max_tokens_limit": state().config.max_tokens_limit}
    )


def parse_query(model: type[M]) -> M:
    return model.model_validate(request.args.to_dict(flat=True), strict=True)


def request_id() -> str:
    return g.request_id
