"""The Flask application factory, and the checks every request passes before its route.

In order: the Host header names this server (DNS rebinding), the server is not shutting
down, a POST body is declared JSON (no CORS-free posts from web pages), and the API key.
Log lines carry the request's path with control characters escaped, so a URL cannot
forge a line.
"""

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
from .errors import APIError, ServerShuttingDown, register_error_handler
from .openapi import is_public
from .redact import printable
from .routes import BLUEPRINTS, CONVERTERS
from .state import EXTENSION_KEY, ServerState
from .web_safety import HostPolicy, require_json

log = logging.getLogger("mlx_engine.server")
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def create_app(config: Optional[ServerConfig] = None) -> Flask:
    """Build the app: engine thread, startup model, blueprints, request checks, CORS, errors, request ids.

    The startup model (if any) is loaded before this returns, so a bad `--model` fails
    the start instead of the first request.
    """
    config = config or ServerConfig()
    hosts = HostPolicy(config.host, config.allowed_hosts)  # a bad --allowed-host fails here
    app = Flask("mlx_engine.server")
    app.url_map.converters.update(CONVERTERS)
    app.config["MAX_CONTENT_LENGTH"] = int(config.max_request_mb * 2**20)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep OpenAI's field order
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    server_state = ServerState.create(config)
    app.extensions[EXTENSION_KEY] = server_state

    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    register_error_handler(app, server_state.redact)
    _install_request_hooks(app, config, hosts, server_state)
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


def _install_request_hooks(app: Flask, config: ServerConfig, hosts: HostPolicy, st: ServerState) -> None:
    expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    @app.before_request
    def start_request() -> None:
        client_id = request.headers.get("X-Request-ID", "")
        g.request_id = client_id if _CLIENT_REQUEST_ID.match(client_id) else uuid.uuid4().hex[:16]
        g.started = time.perf_counter()
        host, port = request.environ.get("HTTP_HOST"), str(request.environ.get("SERVER_PORT", ""))
        if not hosts.allows(host, port):
            raise hosts.refusal(host or "", port)
        if st.stopping.is_set() and request.path != "/health":
            raise ServerShuttingDown()
        if config.log_request_bodies and request.content_length:
            body = request.get_data(cache=True)[:4096].decode("utf-8", "replace")
            log.info("request %s body: %s", g.request_id, printable(body, 4096))
        require_json(request.method, request.mimetype, request.content_type)
        if expected is None or request.method == "OPTIONS" or is_public(request.path):
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
        if config.cors_origins:
            # Whether the CORS headers are present depends on the Origin: a cache must key on it.
            response.vary.add("Origin")
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        log.info(
            "request %s: %s %s -> %d in %.3fs",
            request_id, printable(request.method, 16), printable(request.path), response.status_code, elapsed,
        )
        return response
