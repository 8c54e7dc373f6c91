"""OpenAI-compatible HTTP API with activation capture (Flask app factory, waitress server).

Imported lazily, so `mlx-engine --help` does not load Flask or MLX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServerConfig": "mlx_engine.server.config",
    "create_app": "mlx_engine.server.app",
    "make_server": "mlx_engine.server.wsgi",
    "serve": "mlx_engine.server.wsgi",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mlx_engine.server' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
