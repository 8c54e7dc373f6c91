"""Sparse autoencoders on activation stores: training (train), files (formats: SAELens, Gemma Scope,
the Hub), metrics, features as hook points (attach) and feature pages (pages).

Names are imported on first use (PEP 562), so the command line's parser (sae/cli.py) loads
neither MLX nor numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "SAE": "mlx_engine.sae.model",
    "SAEConfig": "mlx_engine.sae.model",
    "SAEError": "mlx_engine.sae.model",
    "AttachedSAE": "mlx_engine.sae.attach",
    "attach_sae": "mlx_engine.sae.attach",
    "attached_saes": "mlx_engine.sae.attach",
    "detach_sae": "mlx_engine.sae.attach",
    "load_sae": "mlx_engine.sae.formats",
    "save_sae": "mlx_engine.sae.formats",
    "TrainConfig": "mlx_engine.sae.config",
    "TrainResult": "mlx_engine.sae.trainer",
    "train": "mlx_engine.sae.trainer",
    "reconstruction_metrics": "mlx_engine.sae.metrics",
    "ce_loss_recovered": "mlx_engine.sae.metrics",
    "feature_pages": "mlx_engine.sae.pages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_engine.sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
