"""The names of NeuroScope's analysis format, shared by its Python and Smalltalk converters.

Kept apart from `analysis_format.py` (which needs numpy) so the Smalltalk generator, and
the command line that runs it, import nothing heavy.
"""

from __future__ import annotations

ANALYSIS_FORMAT = "neuroscope-analysis"
ANALYSIS_VERSION = 1
KINDS: tuple[str, ...] = ("top_examples", "head_scores", "patching", "sae_features")

# Fields an example keeps, when it has them: Neuronpedia's four, then where it comes from.
EXAMPLE_KEYS: tuple[str, ...] = (
    "tokens", "values", "maxValue", "maxValueTokenIndex", "neuron", "token_ids", "positions", "doc", "pos",
)
# Patching fields copied as they are.
PATCHING_KEYS: tuple[str, ...] = (
    "component", "metric", "layers", "columns", "column_kind", "clean_metric", "corrupted_metric",
    "target", "foil", "position", "target_string", "foil_string", "clean_strings", "corrupted_strings",
)
# Capture metadata a feature entry keeps.
FEATURE_KEYS: tuple[str, ...] = ("hook_id", "layer_name", "layer", "step", "positions")
