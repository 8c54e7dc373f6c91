"""Server responses -> NeuroScope's activation format (docs/neuroscope-format.md).

NeuroScope wants one flat list of numbers per capture plus the metadata that gives it
back its shape and place in the token stream, and the tokens as strings. The result is
plain JSON: it is what a Smalltalk image or a browser page loads, so non-finite values
keep the wire's spelling ("-Infinity", "Infinity", "NaN") instead of becoming literals
no JSON parser accepts. `neuroscope_format.schema.json` beside this file is the
contract, and the tests validate real converted responses against it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any, Optional, Union

import numpy as np

from ...wire.codec import decode_array, decode_capture, json_numbers
from ...wire.fields import REQUIRED_FIELD_NAMES

from .client_results import ActivationResult, choice_text

FORMAT_NAME = "neuroscope-activations"
FORMAT_VERSION = 1
SCHEMA_FILE = "neuroscope_format.schema.json"


def load_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of the format, as shipped with the package."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def _flat_json(values: Optional[np.ndarray]) -> Optional[list[Any]]:
    """Row-major flat values, non-finite floats spelled as the wire spells them."""
    return None if values is None else json_numbers(values.reshape(-1))


def convert_capture(wire: Mapping[str, Any]) -> dict[str, Any]:
    """One wire capture (any encoding) as a NeuroScope entry with flat data."""
    entry: dict[str, Any] = {name: wire.get(name) for name in REQUIRED_FIELD_NAMES}
    entry["data"] = _flat_json(decode_capture(wire))
    extras = {}
    for key, value in wire.items():
        if isinstance(value, Mapping) and {"shape", "dtype", "data"} <= value.keys():
            decoded = decode_array(value["data"], value["shape"], value["dtype"], wire["encoding"])
            extras[key] = {"shape": list(value["shape"]), "dtype": value["dtype"], "data": _flat_json(decoded)}
    if extras:
        entry["extras"] = extras
    return entry


def convert_activations_for_neuroscope(response: Union[Mapping[str, Any], ActivationResult]) -> dict[str, Any]:
    """A with_activations response, chat or text completion (whole, or `ActivationStream.response()`), in NeuroScope's format."""
    body = response.response if isinstance(response, ActivationResult) else response
    choices = body.get("choices") or [{}]
    activations = {
        hook: [convert_capture(c) for c in sorted(caps, key=lambda c: c["step"])]
        for hook, caps in (body.get("activations") or {}).items()
    }
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": body.get("model"),
        "text": choice_text(choices[0]),
        "prompt_tokens": list(body.get("prompt_tokens_text") or []),
        "generated_tokens": list(body.get("generated_tokens_text") or []),
        "prompt_token_ids": list(body.get("prompt_token_ids") or []),
        "generated_token_ids": list(body.get("generated_token_ids") or []),
        "activations": activations,
    }
