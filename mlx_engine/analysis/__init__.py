"""Interpretability analyses on a loaded model: logit lens, direct logit attribution, attention
heads, activation patching, and weight statistics (`mlx-engine analyze`).

Names are imported on first use (PEP 562), so importing the package (and the command
line's parser) loads neither MLX, numpy nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AnalysisError": "mlx_engine.analysis.common",
    "activation_patching": "mlx_engine.analysis.patching",
    "circuits_analysis": "mlx_engine.analysis.runs",
    "compare_checkpoints": "mlx_engine.analysis.weights_compare",
    "direct_logit_attribution": "mlx_engine.analysis.attribution",
    "head_importance": "mlx_engine.analysis.heads",
    "head_scores": "mlx_engine.analysis.heads",
    "logit_lens": "mlx_engine.analysis.lens",
    "prepare_patching": "mlx_engine.analysis.patching",
    "unembedding": "mlx_engine.analysis.unembed",
    "weight_analysis": "mlx_engine.analysis.runs",
    "weight_report": "mlx_engine.analysis.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_engine.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
