"""Blueprints by concern: OpenAI-compatible routes, activations, steering, model management, service."""

from .activations import bp as activations_bp
from .meta import bp as meta_bp
from .models import bp as models_bp
from .openai import bp as openai_bp
from .steering import bp as steering_bp

BLUEPRINTS = (openai_bp, activations_bp, steering_bp, models_bp, meta_bp)

__all__ = ["BLUEPRINTS"]
