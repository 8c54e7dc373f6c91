"""The Flask application factory."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Optional

from flask import Flask, Response, g, request
from flask_cors import CORS

from .config import ServerConfig
from .errors import APIError, register_error_handler
from .openapi import PUBLIC_PATHS
from .routes import BLUEPRINTS
from .state import EXTENSION_KEY, ServerState

log = logging.getLogger("mlx_engine.server")
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(config: Optional[ServerConfig] = None) -> Flask:
    """Build the app: engine thread, startup model, blueprints, auth, CORS, errors, request ids.

    The startup model (if any) is loaded before this returns, so a bad `--model` fails
    the start instead of the first request.
    """
    config = config or ServerConfig()
    app = Flask("mlx_engine.server")
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_request_mb * 2**20)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep OpenAI's field order
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    server_state = ServerState.create(config)
    app.extensions[EXTENSION_KEY] = server_state

    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    register_error_handler(app)
    _install_request_hooks(app, config)
    if config.cors_origins:
        CORS(
            app,
            origins=list(config.cors_origins),
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
            methods=["GET", "POST", "DELETE", "OPTIONS"],
            max_age=600,
        )
    if config.model:
        loaded = server_state.load(config.model)
        log.info("loaded model %s (%s) from %s", loaded.model_id, loaded.kit.model_type, config.model)
    return app


def _install_request_hooks(app: Flask, config: ServerConfig) -> None:
    expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    @app.before_request
    def start_request() -> None:
        client_id = request.headers.get("X-Request-ID", "")
        g.request_id = client_id if _CLIENT_REQUEST_ID.match(client_id) else uuid.uuid4().hex[:16]
        g.started = time.perf_counter()
        if config.log_request_bodies and request.content_length:
            log.info("request %s body: %s", g.request_id, request.get_data(cache=True)[:4096].decode("utf-8", "replace"))
        if expected is None or request.method == "OPTIONS" or request.path in PUBLIC_PATHS:
            return
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(
                "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                status=401,
                type="authentication_error",
                code="invalid_api_key",
            )

    @app.after_request
    def finish_request(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers["X-Request-ID"] = request_id
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        log.info("request %s: %s %s -> %d in %.3fs", request_id, request.method, request.path, response.status_code, elapsed)
        return response
