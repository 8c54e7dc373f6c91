"""mlx-engine: run LLMs on MLX and see inside them while they talk."""

from .activations import CacheResult, create_generator_with_activations, run_with_cache
from .generate import create_generator
from .generation_types import GenerationResult, TokenLogprob
from .hooks import (
    ActivationHookManager,
    ActivationHookSpec,
    Capture,
    CaptureBudgetError,
    ComponentType,
    HookSpecError,
    StepActivations,
    estimate_capture_bytes,
)
from .interventions import InterventionError, resolve_interventions
from .model_kit import ModelKit, ModelLoadError, chat_tokens, load_model, tokenize
from .steering import SteeringVector, steering_vector

__version__ = "0.1.0"

__all__ = [
    "ActivationHookManager",
    "ActivationHookSpec",
    "CacheResult",
    "Capture",
    "CaptureBudgetError",
    "ComponentType",
    "GenerationResult",
    "HookSpecError",
    "InterventionError",
    "ModelKit",
    "ModelLoadError",
    "StepActivations",
    "SteeringVector",
    "TokenLogprob",
    "chat_tokens",
    "create_generator",
    "create_generator_with_activations",
    "estimate_capture_bytes",
    "load_model",
    "resolve_interventions",
    "run_with_cache",
    "steering_vector",
    "tokenize",
]
