"""Interventions as requested: the vocabulary, parsing and every check that needs no model.

An intervention is (hook point, operation, where), written like a hook spec::

    {"layer_name": "model.layers.5", "component": "residual", "op": "add",
     "vector": [...], "scale": 4.0, "positions": "generated"}

The hook point resolves exactly as an activation hook does (`layer_name`, `component`,
`capture_input`, TransformerLens names), so what a researcher captures and what they
edit are named the same way. Operations:

  add    x + scale * vector                      vector: one position's shape (see below)
  zero   0                                       at `indices` / `heads`, or the whole tensor
  mean   a mean vector                           from `values`, `source` or `capture_id`
  clamp  min(max(x, min), max)                   `min` and/or `max`
  scale  x * scale                               `scale`
  patch  the source's row at the same position   from `values`, `source` or `capture_id`
  topk   keep the k largest |x| per position       `k` (dynamic-k gating of neurons)

`indices` choose features along the last axis (neurons of a [T, d_model] tensor, or
dimensions within a head); `heads` choose heads of query/key/value/z ([H, T, head_dim];
`z` is the per-head attention output before the output projection, so zeroing a head
there removes exactly that head's contribution). Where: `positions` is "all" (default),
"prompt", "generated", or a list of absolute token positions. "generated" starts at the
first generated token's own position (prompt_len), so the prompt's logits, and with them
the first generated token, are untouched; in a single forward (run_with_cache) it selects
nothing.

A position's shape is [d_model] for embedding/residual/attention/mlp/layernorm and
[n_heads, head_dim] for query/z ([n_kv_heads, head_dim] for key/value).
`add` takes that shape, or [head_dim] on a head component (added to every chosen head).

Sources (`mean`, `patch`): `values` is array data (JSON-friendly); `source` is a Python
object: a ActivationCache (its capture `capture_id`, by default the intervention's own hook
id), a Capture, a list of Captures (one generation's steps, contiguous), or an array;
`capture_id` alone names an entry of the `sources` mapping given to
`resolve_interventions` (the server's stored captures). An array's rows are positions
0..T-1; a Capture's rows are its own `positions`.
  - mean: a value of exactly one position's shape is the mean vector itself; anything with
    a position axis is averaged over all its positions (and over all entries of a list,
    so a list of ActivationCaches gives the mean over several prompts' positions).
  - patch: position p receives the source's row p. An explicit positions list must lie
    inside the source; "all"/"prompt"/"generated" patch the positions the source covers
    and leave the others alone.

The stages, each in its own module: `spec` parses a request (no model), `resolve`
checks it against the model's shapes once (numpy only, so a server does it on the
request thread), `sources` reads captures given as `source`, and `ops` binds the
prompt-dependent operands and applies the edit inside the forward pass (MLX). A bad
request raises `InterventionError` (a ValueError and a HookSpecError) whose `.param`
names the offending field, e.g. "interventions[2].vector".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from ..hooks.names import HookSpecError

OPS: dict[str, dict[str, Any]] = {
    # op -> fields it requires, fields it may take, and whether it reads a source.
    "add": {"required": ("vector",), "optional": ("scale", "heads"), "source": False},
    "zero": {"required": (), "optional": ("indices", "heads"), "source": False},
    "mean": {"required": (), "optional": ("indices", "heads"), "source": True},
    "clamp": {"required": (), "optional": ("min", "max", "indices", "heads"), "source": False},
    "scale": {"required": ("scale",), "optional": ("indices", "heads"), "source": False},
    "patch": {"required": (), "optional": ("indices", "heads"), "source": True},
    # Dynamic-k gating: keep the k largest-magnitude features per position, zero the rest.
    "topk": {"required": ("k",), "optional": ("heads",), "source": False},
}
SOURCE_FIELDS = ("values", "source", "capture_id", "capture_hook")
COMMON_FIELDS = ("layer_name", "layer", "component", "capture_input", "op", "positions")
POSITION_SETS = ("all", "prompt", "generated")
MAX_REPEATS_SHOWN = 10

Positions = Union[str, tuple[int, ...]]


class InterventionError(HookSpecError):
    """An intervention that cannot run as written; `.param` names the field at fault."""

    def __init__(self, message: str, param: str = "interventions") -> None:
        super().__init__(message, param=param)


@dataclass(frozen=True, eq=False)
class InterventionSpec:
    """One intervention as requested, checked for everything that needs no model."""

    layer_name: Union[str, int]
    op: str
    component: Optional[str] = None
    capture_input: bool = False
    positions: Positions = "all"
    vector: Optional[np.ndarray] = None
    scale: Optional[float] = None
    indices: Optional[tuple[int, ...]] = None
    heads: Optional[tuple[int, ...]] = None
    min: Optional[float] = None
    max: Optional[float] = None
    k: Optional[int] = None
    values: Optional[np.ndarray] = None
    source: Any = None
    capture_id: Optional[str] = None
    # The hook id inside a stored capture or ActivationCache to read (default: the intervention's own).
    capture_hook: Optional[str] = None


def intervention_error(index: int, field: Optional[str], message: str) -> InterventionError:
    """The error for field `field` of intervention `index` (param "interventions[i].field")."""
    param = f"interventions[{index}]" + (f".{field}" if field else "")
    return InterventionError(f"{param}: {message}", param=param)


_fail = intervention_error


def _number(value: Any, index: int, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _fail(index, field, f"'{field}' must be a number, got {value!r}.")
    if not math.isfinite(float(value)):
        raise _fail(index, field, f"'{field}' must be finite, got {value!r}.")
    return float(value)


def _int_list(value: Any, index: int, field: str) -> tuple[int, ...]:
    items = [value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise _fail(index, field, f"'{field}' must be a list of integers, got {value!r}.")
    items = list(items)
    if not items:
        raise _fail(index, field, f"'{field}' is empty: give at least one integer.")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise _fail(index, field, f"'{field}' must hold integers only, got {item!r}.")
    if len(set(items)) != len(items):
        # Linear in the list, and the message names a bounded number of repeats.
        repeated = sorted(int(i) for i, n in Counter(items).items() if n > 1)
        shown = ", ".join(map(str, repeated[:MAX_REPEATS_SHOWN]))
        if len(repeated) > MAX_REPEATS_SHOWN:
            shown += f", ... ({len(repeated)} in all)"
        raise _fail(index, field, f"'{field}' repeats [{shown}]; give each once.")
    return tuple(sorted(int(i) for i in items))


def as_array(value: Any, index: int, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise _fail(index, field, f"'{field}' must be a rectangular array of numbers.") from None
    if arr.size == 0:
        raise _fail(index, field, f"'{field}' is empty.")
    if not np.all(np.isfinite(arr)):
        raise _fail(index, field, f"'{field}' contains NaN or infinite values.")
    return arr


def _positions(value: Any, index: int) -> Positions:
    if isinstance(value, str):
        if value not in POSITION_SETS:
            raise _fail(index, "positions", f"positions must be 'all', 'prompt', 'generated' or a list of token positions, got {value!r}.")
        return value
    if isinstance(value, (float, np.floating, bool)):
        raise _fail(index, "positions", f"positions must be 'all', 'prompt', 'generated' or a list of token positions, got {value!r}.")
    positions = _int_list(value, index, "positions")
    if positions[0] < 0:
        raise _fail(index, "positions", f"positions are absolute token positions (0 and up), got {positions[0]}.")
    return positions


def parse_intervention(spec: Union[InterventionSpec, Mapping[str, Any]], index: int = 0) -> InterventionSpec:
    """Check one intervention's fields and types (no model needed); raise InterventionError."""
    if isinstance(spec, InterventionSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise _fail(index, None, f"an intervention is a dict like {{'layer_name': 5, 'component': 'residual', 'op': 'add', 'vector': [...]}}, got {spec!r}.")
    op = spec.get("op")
    if op is None:
        raise _fail(index, "op", f"'op' is missing; valid ops: {', '.join(OPS)}.")
    if op not in OPS:
        raise _fail(index, "op", f"unknown op {op!r}; valid ops: {', '.join(OPS)}.")
    if spec.get("capture_hook") is not None and spec.get("capture_id") is None and spec.get("source") is None:
        raise _fail(index, "capture_hook", "'capture_hook' names a hook inside a stored capture; give 'capture_id' too.")
    rules = OPS[op]
    allowed = set(COMMON_FIELDS) | set(rules["required"]) | set(rules["optional"])
    if rules["source"]:
        allowed |= set(SOURCE_FIELDS)
    for key in spec:
        if key not in allowed:
            known = set(COMMON_FIELDS) | set(SOURCE_FIELDS) | {f for r in OPS.values() for f in r["required"] + r["optional"]}
            what = "unknown field" if key not in known else f"field does not apply to op {op!r}"
            takes = sorted(allowed - {"layer"})
            raise _fail(index, str(key), f"{what} {key!r}; op {op!r} takes: {', '.join(takes)}.")
    for key in rules["required"]:
        if spec.get(key) is None:
            raise _fail(index, key, f"op {op!r} needs '{key}'.")

    layer_name = spec.get("layer_name", spec.get("layer"))
    if layer_name is None:
        raise _fail(index, "layer_name", "'layer_name' is missing (e.g. 5, 'model.layers.5', 'embedding').")
    capture_input = spec.get("capture_input", False)
    if not isinstance(capture_input, bool):
        raise _fail(index, "capture_input", f"'capture_input' must be true or false, got {capture_input!r}.")
    component = spec.get("component")
    if component is not None and not isinstance(component, str):
        raise _fail(index, "component", f"'component' must be a string, got {component!r}.")

    fields: dict[str, Any] = {}
    if "vector" in spec:
        fields["vector"] = as_array(spec["vector"], index, "vector")
    if spec.get("scale") is not None:
        fields["scale"] = _number(spec["scale"], index, "scale")
    for key in ("min", "max"):
        if spec.get(key) is not None:
            fields[key] = _number(spec[key], index, key)
    if op == "clamp":
        if "min" not in fields and "max" not in fields:
            raise _fail(index, "min", "op 'clamp' needs 'min', 'max' or both.")
        if "min" in fields and "max" in fields and fields["min"] > fields["max"]:
            raise _fail(index, "min", f"'min' ({fields['min']}) is greater than 'max' ({fields['max']}).")
    if spec.get("k") is not None:
        k = spec["k"]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise _fail(index, "k", f"'k' must be an integer of at least 1, got {k!r}.")
        fields["k"] = int(k)
    for key in ("indices", "heads"):
        if spec.get(key) is not None:
            fields[key] = _int_list(spec[key], index, key)
            if fields[key][0] < 0:
                raise _fail(index, key, f"'{key}' must be 0 or more, got {fields[key][0]}.")
    if rules["source"]:
        given = [k for k in SOURCE_FIELDS if k != "capture_hook" and spec.get(k) is not None]
        if not given:
            raise _fail(index, "values", f"op {op!r} needs a source: 'values' (array), 'source' (a capture or ActivationCache) or 'capture_id'.")
        if "values" in given and len(given) > 1:
            raise _fail(index, "values", f"give 'values' or 'source'/'capture_id', not both ({', '.join(given)}).")
        if "values" in given:
            fields["values"] = as_array(spec["values"], index, "values")
        for key in ("capture_id", "capture_hook"):
            if spec.get(key) is not None:
                if not isinstance(spec[key], str):
                    raise _fail(index, key, f"'{key}' must be a string, got {spec[key]!r}.")
                fields[key] = spec[key]
        fields["source"] = spec.get("source")
    return InterventionSpec(
        layer_name=layer_name,
        op=op,
        component=component,
        capture_input=capture_input,
        positions=_positions(spec.get("positions", "all"), index),
        **fields,
    )
