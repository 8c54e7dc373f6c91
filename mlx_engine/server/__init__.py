"""OpenAI-compatible HTTP API with activation capture (Flask app factory, waitress server)."""

from .app import create_app
from .config import ServerConfig
from .server import make_server, serve

__all__ = ["ServerConfig", "create_app", "make_server", "serve"]
