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
from .model_kit import ModelKit, ModelLoadError, chat_tokens, load_model, tokenize

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
    "ModelKit",
    "ModelLoadError",
    "StepActivations",
    "TokenLogprob",
    "chat_tokens",
    "create_generator",
    "create_generator_with_activations",
    "estimate_capture_bytes",
    "load_model",
    "run_with_cache",
    "tokenize",
]
