"""Blueprints by concern: OpenAI-compatible routes, activations, steering, model management, service, viewer,
extraction, stores, analyses and attached SAEs."""

from werkzeug.routing import PathConverter

from .activations import bp as activations_bp
from .analysis import bp as analysis_bp
from .extract import bp as extract_bp
from .meta import bp as meta_bp
from .models import bp as models_bp
from .openai import bp as openai_bp
from .saes import bp as saes_bp
from .steering import bp as steering_bp
from .stores import bp as stores_bp
from .ui import bp as ui_bp

BLUEPRINTS = (openai_bp, activations_bp, steering_bp, models_bp, meta_bp, ui_bp, extract_bp, stores_bp, analysis_bp, saes_bp)


class ModelIdConverter(PathConverter):
    """A model id in a URL (it may hold a '/': 'owner/name'), never 'load' or 'unload'.

    Without the exclusion GET /v1/models/<id> would also match /v1/models/load, so a GET
    there got a 404 for a model named 'load' and a wrong method got an Allow header that
    listed GET; now those paths belong to their POST routes alone.
    """

    regex = r"(?!(?:load|unload)$)[^/].*?"


CONVERTERS = {"model": ModelIdConverter}

__all__ = ["BLUEPRINTS", "CONVERTERS"]
