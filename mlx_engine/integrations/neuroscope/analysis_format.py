"""Analysis results -> NeuroScope's analysis format (docs/neuroscope-format.md).

NeuroScope shows activations as flat numbers with a shape; analysis results are brought
into the same shape so one viewer reads both: a per-head score table or a patching grid
becomes `shape` + flat row-major `data`, top-activating examples keep Neuronpedia's
fields (`tokens`, `values`, `maxValue`, `maxValueTokenIndex`), and SAE feature captures
become per-position feature activations (dense, or the top-k feature ids with their
values). The input is what the analysis functions return as JSON (`top_examples`,
`HeadScores.to_json()`, `PatchingResult.to_json()`, `sae_features` wire captures), which
is also what the HTTP endpoints answer; the Smalltalk `convertAnalysisForNeuroScope:`
does the same conversion (smalltalk_analysis.py). `neuroscope_analysis.schema.json`
beside this file is the contract.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Union

import numpy as np

from ...wire.codec import decode_array, decode_capture, json_numbers
from .analysis_fields import ANALYSIS_FORMAT, ANALYSIS_VERSION, EXAMPLE_KEYS, FEATURE_KEYS, KINDS, PATCHING_KEYS

__all__ = ["KINDS", "analysis_kind", "convert_analysis_for_neuroscope", "load_analysis_schema"]

ANALYSIS_SCHEMA_FILE = "neuroscope_analysis.schema.json"


def load_analysis_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of the analysis format, as shipped with the package."""
    return json.loads(resources.files(__package__).joinpath(ANALYSIS_SCHEMA_FILE).read_text(encoding="utf-8"))


def _flat(values: Any) -> list[Any]:
    """Row-major flat numbers; non-finite ones spelled as the wire spells them."""
    return json_numbers(np.asarray(values, dtype=np.float64).reshape(-1))


def _grid(rows: Any) -> dict[str, Any]:
    array = np.asarray(rows, dtype=np.float64)
    return {"shape": list(array.shape), "data": _flat(array)}


def _envelope(kind: str, **fields: Any) -> dict[str, Any]:
    return {"format": ANALYSIS_FORMAT, "version": ANALYSIS_VERSION, "kind": kind, **fields}


def _examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out = []
    for example in examples:
        entry = {k: example[k] for k in EXAMPLE_KEYS if k in example}
        entry["values"] = _flat(example["values"])
        out.append(entry)
    return _envelope("top_examples", examples=out)


def _head_scores(scores: Mapping[str, Any]) -> dict[str, Any]:
    metrics = {name: _grid(table) for name, table in scores["tables"].items() if table is not None}
    return _envelope(
        "head_scores", n_layers=scores["n_layers"], n_heads=scores["n_heads"], metrics=metrics,
        ranked=scores.get("ranked") or {},
    )


def _patching(result: Mapping[str, Any]) -> dict[str, Any]:
    fractions, metrics = _grid(result["fractions"]), _grid(result["metrics"])
    fields = {k: result.get(k) for k in PATCHING_KEYS}
    return _envelope("patching", **fields, shape=fractions["shape"], fractions=fractions["data"], metrics=metrics["data"])


def _feature_entry(capture: Mapping[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {k: capture.get(k) for k in FEATURE_KEYS}
    entry["shape"] = list(capture["shape"])
    values = capture.get("values")
    if isinstance(values, Mapping):  # top-k: the data are feature ids, their activations an extra
        entry["mode"] = "top_k"
        entry["feature_ids"] = [int(i) for i in np.asarray(decode_capture(capture)).reshape(-1)]
        entry["values"] = _flat(decode_array(values["data"], values["shape"], values["dtype"], capture["encoding"]))
    else:
        entry["mode"] = "dense"
        entry["values"] = _flat(decode_capture(capture))
    return entry


def _features(captures: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return _envelope("sae_features", features=[_feature_entry(c) for c in captures])


def _is_capture(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("component") == "sae_features"


def analysis_kind(result: Any) -> str:
    """Which analysis `result` is (one of KINDS), read from its fields as the Smalltalk converter reads them."""
    if isinstance(result, Mapping):
        if "tables" in result and "n_heads" in result:
            return "head_scores"
        if "fractions" in result and "column_kind" in result:
            return "patching"
        if _is_capture(result) or "activations" in result:
            return "sae_features"
        if isinstance(result.get("examples", result.get("data")), list):
            return analysis_kind(result.get("examples", result.get("data")))
    elif isinstance(result, Sequence) and not isinstance(result, (str, bytes)):
        if result and all(_is_capture(c) for c in result):
            return "sae_features"
        if all(isinstance(e, Mapping) and "maxValueTokenIndex" in e for e in result):
            return "top_examples"
    raise ValueError(
        "not an analysis result NeuroScope knows: give top examples (a list with Neuronpedia's tokens, values, maxValue, "
        "maxValueTokenIndex), head scores (HeadScores.to_json()), a patching result (PatchingResult.to_json()), or "
        "sae_features captures (a capture, a list of them, or a with_activations response)"
    )


def convert_analysis_for_neuroscope(result: Union[Mapping[str, Any], Sequence[Any]]) -> dict[str, Any]:
    """An analysis result (as JSON) in NeuroScope's analysis format; ValueError names what is accepted."""
    kind = analysis_kind(result)
    body: Any = result
    if isinstance(result, Mapping) and kind in ("top_examples", "sae_features") and not _is_capture(result):
        body = result.get("examples", result.get("data")) if "activations" not in result else result["activations"]
    if kind == "top_examples":
        return _examples(body)
    if kind == "head_scores":
        return _head_scores(body)
    if kind == "patching":
        return _patching(body)
    if _is_capture(body):
        body = [body]
    elif isinstance(body, Mapping):  # a response's activations: every sae_features capture, by hook id then step
        body = sorted((c for captures in body.values() for c in captures if _is_capture(c)), key=lambda c: (c["hook_id"], c["step"]))
    return _features(body)

