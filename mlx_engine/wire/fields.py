"""The fields of a capture on the wire, defined once.

A capture's metadata (`Capture.metadata()`), the response schema of the OpenAPI
document, the Python client's `DecodedCapture`, the JavaScript client and the Smalltalk
converter all read this table, so none of them can disagree about a field's name or
whether it is always present.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WireField:
    """One metadata field of a wire capture."""

    name: str
    json_type: str  # JSON Schema type: "string", "integer", "boolean", "array"
    nullable: bool
    description: str
    optional: bool = False  # left out of the object when it does not apply
    required: bool = True  # always present in the object (null allowed where nullable)
    choices: tuple[str, ...] = ()


CAPTURE_FIELDS: tuple[WireField, ...] = (
    WireField("hook_id", "string", False, "The id the request gave the hook (or its canonical id)."),
    WireField("layer_name", "string", False, "Canonical layer name: 'layers.{i}', 'embedding' or 'final_norm'."),
    WireField("layer", "integer", True, "The layer index; null for the embedding and the final norm."),
    WireField("component", "string", False, "The component captured (residual, attention_pattern, ...)."),
    WireField("step", "integer", False, "0 for the prompt (one or more prefill chunks), k for the k-th generated token."),
    WireField("positions", "array", False, "Absolute token positions [start, end) of the capture's rows."),
    WireField("key_positions", "array", True, "Scores and patterns: the absolute position of each key column.", required=False),
    WireField("is_input", "boolean", False, "Whether the sublayer's input was captured rather than its output."),
    WireField("shape", "array", False, "The tensor's shape."),
    WireField("dtype", "string", False, "float32, float16, bfloat16, or an integer type."),
    WireField(
        "edit", "string", True,
        "Present where an intervention edits the same hook point: the tensor before or after the edit.",
        optional=True, required=False, choices=("before", "after"),
    ),
    WireField(
        "indices", "array", True,
        "Present where the hook asked for a feature subset: the index (along the last axis) of each column.",
        optional=True, required=False,
    ),
    WireField(
        "row_positions", "array", True,
        "Present where the hook asked for a position subset: the absolute position of each row.",
        optional=True, required=False,
    ),
)
# What every wire object adds to the metadata.
ENCODING_FIELDS: tuple[str, ...] = ("encoding", "data")

CAPTURE_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in CAPTURE_FIELDS)
REQUIRED_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in CAPTURE_FIELDS if not f.optional)
