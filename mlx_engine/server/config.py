"""What an operator decides about a server, in one immutable object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class ServerConfig:
    """Settings for `create_app` and `serve`.

    Defaults are the safe ones: loopback only, no CORS, no model loading outside the
    configured roots, no Host header but the bound address (DNS rebinding), a capture
    budget and a prompt limit so one request cannot exhaust memory or hold the engine.
    """

    model: Optional[str] = None  # loaded at startup (a folder or a Hugging Face repo id)
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    cors_origins: tuple[str, ...] = ()
    # Host header names accepted besides the bound address and loopback ("name" or "name:port").
    allowed_hosts: tuple[str, ...] = ()
    model_roots: tuple[Path, ...] = ()
    allow_hub_models: bool = True  # POST /v1/models/load may name a Hugging Face repo id
    capture_budget_mb: float = 1024.0  # per request, estimated before generating
    max_tokens_limit: int = 4096
    default_max_tokens: int = 512
    max_prompt_tokens: int = 32768  # 0: only the model's context bounds a prompt
    capture_store_items: int = 16
    capture_store_mb: float = 1024.0
    # Activation stores: POST /v1/extract writes new folders here only, GET /v1/stores reads only these (None: both off).
    store_root: Optional[Path] = None
    # SAE folders POST /v1/models/{id}/saes may attach (besides those under model_roots; Hub ids unless allow_hub_models is off).
    sae_roots: tuple[Path, ...] = ()
    max_request_mb: float = 16.0
    threads: int = 16  # WSGI worker threads: streams in flight + requests waiting for the engine
    log_request_bodies: bool = False
    shutdown_grace_s: float = 10.0  # SIGINT/SIGTERM: how long open streams get to receive their last events
    max_batch_size: int = 8  # generations decoded together in one forward (1: one at a time)
    prompt_cache_mb: float = 256.0  # KV caches of recent prompts, reused by prompts sharing a prefix; 0: off
    # "tensor" | "pipeline": the startup model is split over the ranks of an mx.distributed job (server/parallel.py).
    parallel: Optional[str] = None

    @property
    def capture_budget_bytes(self) -> int:
        return int(self.capture_budget_mb * 2**20)

    @property
    def prompt_cache_bytes(self) -> int:
        return int(self.prompt_cache_mb * 2**20)

    @property
    def capture_store_bytes(self) -> int:
        return int(self.capture_store_mb * 2**20)

    @property
    def effective_default_max_tokens(self) -> int:
        return min(self.default_max_tokens, self.max_tokens_limit)
