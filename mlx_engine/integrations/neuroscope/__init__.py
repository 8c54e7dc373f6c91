"""The NeuroScope bridge: a Python client, the activation-format converter, hook presets and
the Smalltalk client generator, all driven by one endpoint table (endpoints.py)."""

from .client import ActivationResult, DecodedCapture, NeuroScopeClient, NeuroScopeError, decode_activations
from .format import convert_activations_for_neuroscope, load_schema
from .presets import create_attention_analysis_hooks, create_hook_specs_for_circuit_analysis
from .smalltalk import DIALECTS, generate_smalltalk_client

__all__ = [
    "ActivationResult",
    "DIALECTS",
    "DecodedCapture",
    "NeuroScopeClient",
    "NeuroScopeError",
    "convert_activations_for_neuroscope",
    "create_attention_analysis_hooks",
    "create_hook_specs_for_circuit_analysis",
    "decode_activations",
    "generate_smalltalk_client",
    "load_schema",
]
