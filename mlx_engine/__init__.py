"""mlx-engine: run LLMs on MLX and see inside them while they talk.

The public API is imported on first use (PEP 562), so `import mlx_engine` and the
command line start fast, and the HTTP client and wire codec never load MLX.
Where each name lives is the layout of docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from .blas import ensure_fast_blas

__version__ = "0.1.0"
# Before anything imports MLX: on Linux, MLX's CPU backend then binds to the system OpenBLAS.
ensure_fast_blas()

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ActivationHookManager": "mlx_engine.hooks.registry",
    "ActivationStore": "mlx_engine.store.reader",
    "extract": "mlx_engine.store.extract",
    "attach_sae": "mlx_engine.sae.attach",
    "load_sae": "mlx_engine.sae.formats",
    "ActivationHookSpec": "mlx_engine.hooks.names",
    "BoundIntervention": "mlx_engine.interventions.ops",
    "ActivationCache": "mlx_engine.generation.cache",
    "Capture": "mlx_engine.hooks.capture",
    "CaptureBudgetError": "mlx_engine.hooks.budget",
    "ComponentType": "mlx_engine.hooks.components",
    "GenerationResult": "mlx_engine.generation.types",
    "HookSpecError": "mlx_engine.hooks.names",
    "InterventionError": "mlx_engine.interventions.spec",
    "ModelKit": "mlx_engine.loading",
    "ModelLoadError": "mlx_engine.loading",
    "ResolvedHook": "mlx_engine.hooks.names",
    "ResolvedIntervention": "mlx_engine.interventions.resolve",
    "StepActivations": "mlx_engine.hooks.capture",
    "SteeringVector": "mlx_engine.interventions.steering",
    "TokenLogprob": "mlx_engine.generation.types",
    "chat_tokens": "mlx_engine.loading",
    "create_generator": "mlx_engine.generation.api",
    "create_generator_with_activations": "mlx_engine.generation.api",
    "estimate_capture_bytes": "mlx_engine.hooks.budget",
    "load_model": "mlx_engine.loading",
    "prepare_interventions": "mlx_engine.interventions.ops",
    "resolve_hooks": "mlx_engine.hooks.names",
    "run_with_cache": "mlx_engine.generation.api",
    "steering_vector": "mlx_engine.interventions.steering",
    "tokenize": "mlx_engine.loading",
    "verify": "mlx_engine.verify",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


_SUBPACKAGES = ("analysis", "generation", "hooks", "integrations", "interventions", "models", "server", "tools", "wire")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"mlx_engine.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
