"""Serving the app with waitress, configured so Server-Sent Events leave as they are made.

Why waitress: it is a pure-Python production WSGI server that runs on every platform
MLX runs on, and it has the two behaviours streaming generation needs.

- It writes each chunk of a streamed body to the socket at once. A task thread's
  `write` flushes as soon as the channel's buffer holds `send_bytes` bytes, and that
  threshold is 1 byte in waitress 3 (the option is deprecated at that value), so every
  SSE event is sent when it is yielded; the tests measure that the first event arrives
  while generation is still running.
- With `channel_request_lookahead` above 0 it keeps reading a connection while a
  request runs, so it notices a client that hangs up and offers
  `environ["waitress.client_disconnected"]`; the streaming code polls it and stops the
  generation within one step, freeing the model for the next request.

Worker threads only wait on the engine thread and relay its events, so there can be
more of them than cores: each in-flight stream or queued request holds one.

`serve` runs waitress's socket loop itself so SIGINT and SIGTERM end the server cleanly
(shutdown.py): open streams get a last error event and [DONE], the engine thread is
joined, and the process exits 0 instead of aborting inside MLX.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from flask import Flask
from waitress.server import create_server

from .app import create_app
from .config import ServerConfig
from .shutdown import run_until_stopped
from .state import EXTENSION_KEY

log = logging.getLogger("mlx_engine.server")
REQUEST_LOOKAHEAD = 4


def make_server(app: Flask, config: ServerConfig) -> Any:
    """A waitress server bound to config.host:config.port (port 0: any free port)."""
    return create_server(
        app,
        host=config.host,
        port=config.port,
        threads=config.threads,
        channel_request_lookahead=REQUEST_LOOKAHEAD,
        ident="mlx-engine",
        # Flask refuses bodies over max_request_mb with a JSON 413; this is the backstop
        # that stops waitress buffering an unbounded body before Flask sees it.
        max_request_body_size=4 * int(config.max_request_mb * 2**20) + 65536,
    )


def serve(config: ServerConfig, app: Optional[Flask] = None) -> bool:
    """Build the app (loading the startup model) and serve until SIGINT or SIGTERM.

    Returns whether the engine thread went idle (see shutdown.py).
    """
    app = app or create_app(config)
    server = make_server(app, config)
    host, port = server.effective_host, server.effective_port
    log.info("mlx-engine serving on http://%s:%s (viewer at http://%s:%s/ui/, OpenAPI at /openapi.json)", host, port, host, port)
    return run_until_stopped(server, app.extensions[EXTENSION_KEY], config.shutdown_grace_s)
