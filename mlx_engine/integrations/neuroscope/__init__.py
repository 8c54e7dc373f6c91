"""The NeuroScope bridge: a Python client, the activation-format converter, hook presets and
the Smalltalk client generator, all driven by one endpoint table (endpoints.py).

Names are imported on first use (PEP 562): the command line reads the generator without
numpy, and the client never loads MLX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActivationResult": "client",
    "DecodedCapture": "client",
    "NeuroScopeClient": "client",
    "NeuroScopeError": "client",
    "decode_activations": "client",
    "convert_activations_for_neuroscope": "format",
    "load_schema": "format",
    "create_attention_analysis_hooks": "presets",
    "create_hook_specs_for_circuit_analysis": "presets",
    "create_neuron_hooks": "presets",
    "DIALECTS": "smalltalk",
    "generate_smalltalk_client": "smalltalk",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
