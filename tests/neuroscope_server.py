"""A real mlx-engine server on a free loopback port, serving the embedded default model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlx_engine.server import ServerConfig, create_app, make_server


@contextmanager
def running_server(model: str = "default", **overrides: Any) -> Iterator[str]:
    """Serve `model` in a background thread; yields the base URL, stops the server after.

    `overrides` sets other ServerConfig fields (an API key, CORS origins, ...)."""
    config = ServerConfig(model=model, port=0, threads=4, **overrides)
    server = make_server(create_app(config), config)
    thread = threading.Thread(target=server.run, name="neuroscope-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(timeout=10)
