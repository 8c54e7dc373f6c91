"""Interventions: edit a hook point's tensor during a forward pass (steering, ablation, patching).

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
object: a CacheResult (its capture `capture_id`, by default the intervention's own hook
id), a Capture, a list of Captures (one generation's steps, contiguous), or an array;
`capture_id` alone names an entry of the `sources` mapping given to
`resolve_interventions` (the server's stored captures). An array's rows are positions
0..T-1; a Capture's rows are its own `positions`.
  - mean: a value of exactly one position's shape is the mean vector itself; anything with
    a position axis is averaged over all its positions (and over all entries of a list,
    so a list of CacheResults gives the mean over several prompts' positions).
  - patch: position p receives the source's row p. An explicit positions list must lie
    inside the source; "all"/"prompt"/"generated" patch the positions the source covers
    and leave the others alone.

Everything is checked by `resolve_interventions` before a forward runs; a bad request
raises `InterventionError` (a ValueError and a HookSpecError) whose `.param` names the
offending field, e.g. "interventions[2].vector".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Union

import mlx.core as mx
import numpy as np

from .hooks.capture import Capture
from .hooks.components import ComponentType
from .hooks.spec import HookSpecError, ResolvedHook, resolve_hook_specs

if TYPE_CHECKING:
    from .model_kit import ModelKit
    from .models.base import ArchitectureInfo

C = ComponentType

OPS: dict[str, dict[str, Any]] = {
    # op -> fields it requires, fields it may take, and whether it reads a source.
    "add": {"required": ("vector",), "optional": ("scale", "heads"), "source": False},
    "zero": {"required": (), "optional": ("indices", "heads"), "source": False},
    "mean": {"required": (), "optional": ("indices", "heads"), "source": True},
    "clamp": {"required": (), "optional": ("min", "max", "indices", "heads"), "source": False},
    "scale": {"required": ("scale",), "optional": ("indices", "heads"), "source": False},
    "patch": {"required": (), "optional": ("indices", "heads"), "source": True},
}
SOURCE_FIELDS = ("values", "source", "capture_id")
COMMON_FIELDS = ("layer_name", "layer", "component", "capture_input", "op", "positions")
POSITION_SETS = ("all", "prompt", "generated")
HEAD_COMPONENTS = (C.QUERY, C.KEY, C.VALUE, C.Z)
EDITABLE = (C.EMBEDDING, C.RESIDUAL, C.ATTENTION, C.MLP, C.LAYERNORM) + HEAD_COMPONENTS

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
    values: Optional[np.ndarray] = None
    source: Any = None
    capture_id: Optional[str] = None


def _fail(index: int, field: Optional[str], message: str) -> InterventionError:
    param = f"interventions[{index}]" + (f".{field}" if field else "")
    return InterventionError(f"{param}: {message}", param=param)


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
        repeated = sorted({int(i) for i in items if items.count(i) > 1})
        raise _fail(index, field, f"'{field}' repeats {repeated}.")
    return tuple(sorted(int(i) for i in items))


def _array(value: Any, index: int, field: str) -> np.ndarray:
    if isinstance(value, mx.array):
        value = np.array(value.astype(mx.float32))
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
    """Check one intervention's fields and types (no model needed); raise InterventionError.

    The server can call this in its request thread; `resolve_interventions` then checks
    what depends on the model and the prompt.
    """
    if isinstance(spec, InterventionSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise _fail(index, None, f"an intervention is a dict like {{'layer_name': 5, 'component': 'residual', 'op': 'add', 'vector': [...]}}, got {spec!r}.")
    op = spec.get("op")
    if op is None:
        raise _fail(index, "op", f"'op' is missing; valid ops: {', '.join(OPS)}.")
    if op not in OPS:
        raise _fail(index, "op", f"unknown op {op!r}; valid ops: {', '.join(OPS)}.")
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
        fields["vector"] = _array(spec["vector"], index, "vector")
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
    for key in ("indices", "heads"):
        if spec.get(key) is not None:
            fields[key] = _int_list(spec[key], index, key)
            if fields[key][0] < 0:
                raise _fail(index, key, f"'{key}' must be 0 or more, got {fields[key][0]}.")
    if rules["source"]:
        given = [k for k in SOURCE_FIELDS if spec.get(k) is not None]
        if not given:
            raise _fail(index, "values", f"op {op!r} needs a source: 'values' (array), 'source' (a capture or CacheResult) or 'capture_id'.")
        if "values" in given and len(given) > 1:
            raise _fail(index, "values", f"give 'values' or 'source'/'capture_id', not both ({', '.join(given)}).")
        if "values" in given:
            fields["values"] = _array(spec["values"], index, "values")
        if spec.get("capture_id") is not None:
            if not isinstance(spec["capture_id"], str):
                raise _fail(index, "capture_id", f"'capture_id' must be a string, got {spec['capture_id']!r}.")
            fields["capture_id"] = spec["capture_id"]
        fields["source"] = spec.get("source")
    return InterventionSpec(
        layer_name=layer_name,
        op=op,
        component=component,
        capture_input=capture_input,
        positions=_positions(spec.get("positions", "all"), index),
        **fields,
    )


class ResolvedIntervention:
    """One checked intervention bound to a site; `apply` edits one forward pass's tensor.

    Hook tensors keep the batch axis: [B, T, d] or [B, H, T, D]. Operands are kept as
    numpy until the first `apply` (on the thread that runs the model, where MLX arrays
    belong) and then as MLX arrays shaped to broadcast against the hook tensor.
    """

    def __init__(
        self,
        hook: ResolvedHook,
        spec: InterventionSpec,
        index: int,
        prompt_len: int,
        n_heads: int,
        width: int,
        operand: Optional[np.ndarray] = None,
        source_start: int = 0,
    ) -> None:
        self.hook = hook
        self.n_heads = n_heads  # 0 for [B, T, d] sites
        self.width = width  # d, or head_dim for [B, H, T, D] sites
        self.spec = spec
        self.index = index
        self.prompt_len = prompt_len
        self.heads_layout = hook.component in HEAD_COMPONENTS
        self._operand = operand
        self._source_start = source_start
        self._source_len = 0 if spec.op != "patch" or operand is None else operand.shape[-2]
        self._mx: Optional[dict[str, Optional[mx.array]]] = None

    @property
    def site(self) -> str:
        return self.hook.site

    @property
    def op(self) -> str:
        return self.spec.op

    def metadata(self) -> dict[str, Any]:
        """What the intervention does, JSON-ready (no array data), for echoing in responses."""
        s = self.spec
        meta: dict[str, Any] = {
            "index": self.index,
            "hook_id": self.hook.hook_id,
            "layer_name": self.hook.layer_name,
            "layer": self.hook.layer,
            "component": self.hook.component.value,
            "is_input": self.hook.is_input,
            "op": s.op,
            "positions": s.positions if isinstance(s.positions, str) else list(s.positions),
        }
        for key in ("scale", "min", "max"):
            if getattr(s, key) is not None:
                meta[key] = getattr(s, key)
        for key in ("indices", "heads"):
            if getattr(s, key) is not None:
                meta[key] = list(getattr(s, key))
        if s.op == "patch":
            meta["source_positions"] = [self._source_start, self._source_start + self._source_len]
        return meta

    def _bind(self) -> dict[str, Optional[mx.array]]:
        if self._mx is not None:
            return self._mx
        s = self.spec
        operand = None
        if self._operand is not None:
            operand = mx.array(self._operand)
            if s.op != "patch":  # one position: [d] -> [1, 1, d]; [H, D] -> [1, H, 1, D]
                operand = operand[None, :, None, :] if self.heads_layout else operand[None, None, :]
        mask = None
        if s.indices is not None or s.heads is not None:
            cols = list(s.indices) if s.indices is not None else list(range(self.width))
            if self.heads_layout:
                rows = list(s.heads) if s.heads is not None else list(range(self.n_heads))
                keep = np.zeros((self.n_heads, self.width), dtype=bool)
                keep[np.ix_(rows, cols)] = True
                mask = mx.array(keep)[None, :, None, :]
            else:
                keep = np.zeros(self.width, dtype=bool)
                keep[cols] = True
                mask = mx.array(keep)[None, None, :]
        self._mx = {"operand": operand, "features": mask}
        return self._mx

    def _rows(self, start: int, end: int) -> Optional[np.ndarray]:
        """Which rows of the pass [start, end) the edit touches: None for all of them."""
        where = self.spec.positions
        pos = np.arange(start, end)
        if where == "all":
            rows = None
        elif where == "prompt":
            rows = None if end <= self.prompt_len else pos < self.prompt_len
        elif where == "generated":
            rows = None if start >= self.prompt_len else pos >= self.prompt_len
        else:
            rows = np.isin(pos, np.array(where))
        if self.spec.op == "patch":
            covered = (pos >= self._source_start) & (pos < self._source_start + self._source_len)
            if not covered.all():
                rows = covered if rows is None else rows & covered
        return rows

    def apply(self, x: mx.array, start: int, end: int) -> mx.array:
        """The edited tensor for the pass covering absolute positions [start, end)."""
        rows = self._rows(start, end)
        if rows is not None and not rows.any():
            return x
        bound = self._bind()
        op, s = self.spec.op, self.spec
        if op == "add":
            new = x + bound["operand"]
        elif op == "zero":
            new = mx.zeros_like(x)
        elif op == "mean":
            new = mx.broadcast_to(bound["operand"], x.shape)
        elif op == "clamp":
            new = x
            if s.min is not None:
                new = mx.maximum(new, s.min)
            if s.max is not None:
                new = mx.minimum(new, s.max)
        elif op == "scale":
            new = x * s.scale
        else:  # patch: the source row at each position of the pass
            take = mx.array(np.clip(np.arange(start, end) - self._source_start, 0, self._source_len - 1))
            src = bound["operand"]
            new = (src[:, take] if self.heads_layout else src[take])[None]
        mask = bound["features"]
        if rows is not None:
            row_mask = mx.array(rows)
            row_mask = row_mask[None, None, :, None] if self.heads_layout else row_mask[None, :, None]
            mask = row_mask if mask is None else mx.logical_and(mask, row_mask)
        if mask is not None:
            new = mx.where(mask, new, x)
        return new.astype(x.dtype)

    def __repr__(self) -> str:
        return f"ResolvedIntervention({self.metadata()!r})"


InterventionRequest = Union[InterventionSpec, Mapping[str, Any], ResolvedIntervention]


def _site_shape(info: Any, component: ComponentType) -> tuple[int, int]:
    """(heads, width) of one position at a site: (0, d_model) for unheaded components."""
    if component in (C.QUERY, C.Z):
        return info.n_heads, info.head_dim
    if component in (C.KEY, C.VALUE):
        return info.n_kv_heads, info.head_dim
    return 0, info.d_model


def _shape_text(n_heads: int, width: int, rows: Optional[str] = None) -> str:
    parts = ([str(n_heads)] if n_heads else []) + ([rows] if rows else []) + [str(width)]
    return "[" + ", ".join(parts) + "]"


def _source_arrays(
    source: Any, capture_id: Optional[str], default_id: str, index: int, field: str
) -> list[tuple[np.ndarray, int]]:
    """A source as (rows, first position) pieces: arrays start at 0, captures at their positions."""
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, Capture) or hasattr(s, "activations") for s in source):
        out: list[tuple[np.ndarray, int]] = []
        for s in source:
            out.extend(_source_arrays(s, capture_id, default_id, index, field))
        return out
    if isinstance(source, Capture):
        return [(_array(source.array, index, field), source.positions[0])]
    activations = getattr(source, "activations", None)
    if isinstance(activations, Mapping):  # a CacheResult
        key = capture_id or default_id
        if key not in activations:
            raise _fail(
                index, "capture_id",
                f"the source has no capture {key!r}; it holds: {', '.join(sorted(activations)) or 'nothing'}.",
            )
        return _source_arrays(activations[key], None, default_id, index, field)
    return [(_array(source, index, field), 0)]


def _check_rows(arr: np.ndarray, n_heads: int, width: int, index: int, field: str, what: str) -> None:
    expected_ndim = 3 if n_heads else 2
    ok = arr.ndim == expected_ndim and arr.shape[-1] == width and (not n_heads or arr.shape[0] == n_heads)
    if not ok:
        raise _fail(
            index, field,
            f"{what} must have shape {_shape_text(n_heads, width, 'T')}, got {list(arr.shape)}.",
        )


def _mean_operand(pieces: list[tuple[np.ndarray, int]], n_heads: int, width: int, index: int, field: str, site: str) -> np.ndarray:
    one = (n_heads, width) if n_heads else (width,)
    if len(pieces) == 1 and pieces[0][0].shape == one:
        return pieces[0][0]
    rows = []
    for arr, _ in pieces:
        if arr.shape == one:
            rows.append(arr[..., None, :])
            continue
        _check_rows(arr, n_heads, width, index, field, f"the mean source for {site} (a mean vector {list(one)}, or captures)")
        rows.append(arr)
    axis = 1 if n_heads else 0
    return np.concatenate(rows, axis=axis).mean(axis=axis, dtype=np.float64).astype(np.float32)


def _patch_operand(pieces: list[tuple[np.ndarray, int]], n_heads: int, width: int, index: int, field: str, site: str) -> tuple[np.ndarray, int]:
    axis = 1 if n_heads else 0
    expected = pieces[0][1]
    for arr, first in pieces:
        _check_rows(arr, n_heads, width, index, field, f"the patch source for {site}")
        if first != expected:
            raise _fail(index, field, f"the patch source's captures are not contiguous: one starts at position {first}, expected {expected}.")
        expected = first + arr.shape[axis]
    return np.concatenate([a for a, _ in pieces], axis=axis), pieces[0][1]


def _resolve_site(kit: "ModelKit", spec: InterventionSpec, index: int) -> ResolvedHook:
    return _site(kit.arch_info, kit.native, spec, index)


def _site(info: "ArchitectureInfo", native: bool, spec: InterventionSpec, index: int) -> ResolvedHook:
    request = {
        "layer_name": spec.layer_name,
        "component": spec.component,
        "capture_input": spec.capture_input,
        "capture_output": not spec.capture_input,
    }
    try:
        (hook,) = resolve_hook_specs(info, [request], native)
    except HookSpecError as exc:
        message = str(exc).removeprefix("activation_hooks[0]: ")
        about_component = message.startswith(("Unknown component", "Component ", "No component", "The embedding offers", "The final norm offers"))
        raise _fail(index, "component" if about_component else "layer_name", message) from None
    if hook.component not in EDITABLE:
        valid = ", ".join(c.value for c in EDITABLE)
        raise _fail(index, "component", f"component {hook.component.value!r} cannot be edited; interventions act on: {valid}.")
    return hook


def resolve_interventions(
    kit: "ModelKit",
    specs: Optional[Iterable[InterventionRequest]],
    *,
    prompt_len: int,
    max_tokens: int = 0,
    sources: Optional[Mapping[str, Any]] = None,
) -> list[ResolvedIntervention]:
    """Check interventions against the model and the run; raise InterventionError on the first bad one.

    `prompt_len` and `max_tokens` fix which positions pass through the model: the prompt's
    0..prompt_len-1 and, when generating, one more per token but the last
    (max_tokens=0 for a single forward such as run_with_cache). `sources` maps a
    `capture_id` to a stored capture (Capture, list of Captures, CacheResult or array).
    Already-resolved interventions pass through if they were resolved for the same prompt length.
    """
    n_positions = prompt_len + max(max_tokens - 1, 0)
    resolved: list[ResolvedIntervention] = []
    for index, raw in enumerate(specs or ()):
        if isinstance(raw, ResolvedIntervention):
            if raw.prompt_len != prompt_len:
                raise _fail(index, None, f"this intervention was resolved for a {raw.prompt_len}-token prompt, not {prompt_len}.")
            resolved.append(raw)
            continue
        spec = parse_intervention(raw, index)
        hook = _resolve_site(kit, spec, index)
        resolved.append(_resolve_operands(kit, spec, hook, index, prompt_len, n_positions, sources))
    return resolved


def _resolve_operands(
    kit: "ModelKit",
    spec: InterventionSpec,
    hook: ResolvedHook,
    index: int,
    prompt_len: int,
    n_positions: int,
    sources: Optional[Mapping[str, Any]],
) -> ResolvedIntervention:
    n_heads, width = _site_shape(kit.arch_info, hook.component)
    site = hook.hook_id
    if isinstance(spec.positions, tuple) and spec.positions[-1] >= n_positions:
        raise _fail(
            index, "positions",
            f"position {spec.positions[-1]} is out of range: this run passes positions 0..{n_positions - 1} "
            f"through the model (a {prompt_len}-token prompt, then one position per generated token but the last).",
        )
    _check_heads_and_indices(spec, site, n_heads, width, index)

    operand: Optional[np.ndarray] = None
    source_start = 0
    if spec.op == "add":
        operand = _add_operand(spec, site, n_heads, width, index)
    elif spec.op in ("mean", "patch"):
        field = "values" if spec.values is not None else ("source" if spec.source is not None else "capture_id")
        if spec.values is not None:
            pieces = [(spec.values, 0)]
        elif spec.source is not None:
            pieces = _source_arrays(spec.source, spec.capture_id, hook.hook_id, index, field)
        else:
            stored = sources or {}
            if spec.capture_id not in stored:
                known = ", ".join(sorted(stored)) or "none"
                raise _fail(index, "capture_id", f"no stored capture {spec.capture_id!r}; stored: {known}.")
            pieces = _source_arrays(stored[spec.capture_id], None, hook.hook_id, index, field)
        if spec.op == "mean":
            operand = _mean_operand(pieces, n_heads, width, index, field, site)
        else:
            operand, source_start = _patch_operand(pieces, n_heads, width, index, field, site)
            _check_patch_coverage(spec, operand.shape[1 if n_heads else 0], source_start, prompt_len, n_positions, index, field)
    return ResolvedIntervention(hook, spec, index, prompt_len, n_heads, width, operand, source_start)


def _check_heads_and_indices(spec: InterventionSpec, site: str, n_heads: int, width: int, index: int) -> None:
    if spec.heads is not None:
        if not n_heads:
            raise _fail(
                index, "heads",
                f"'heads' applies to query, key, value and z; {site} has no head axis (use 'indices').",
            )
        if spec.heads[-1] >= n_heads:
            raise _fail(index, "heads", f"head {spec.heads[-1]} is out of range: {site} has {n_heads} heads (0..{n_heads - 1}).")
    if spec.indices is not None and spec.indices[-1] >= width:
        unit = "per head" if n_heads else "per position"
        raise _fail(index, "indices", f"index {spec.indices[-1]} is out of range: {site} has {width} features {unit} (0..{width - 1}).")


def _add_operand(spec: InterventionSpec, site: str, n_heads: int, width: int, index: int) -> np.ndarray:
    """scale * vector in one position's shape (a [head_dim] vector repeated over the heads)."""
    vec = spec.vector
    assert vec is not None
    if n_heads and vec.shape == (width,):
        vec = np.broadcast_to(vec, (n_heads, width))
    expected = (n_heads, width) if n_heads else (width,)
    if vec.shape != expected:
        also = f" or [{width}] (added to each chosen head)" if n_heads else ""
        raise _fail(index, "vector", f"vector for {site} must have shape {list(expected)}{also}, got {list(spec.vector.shape)}.")
    return (vec * np.float32(1.0 if spec.scale is None else spec.scale)).astype(np.float32)


def check_interventions(
    info: "ArchitectureInfo", native: bool, specs: Optional[Iterable[Union[InterventionSpec, Mapping[str, Any]]]]
) -> list[InterventionSpec]:
    """Check interventions against a model's shapes alone: no MLX, no prompt, no stored captures.

    A server runs this on its request threads, so a bad hook name, head, index or vector
    shape is refused at once instead of after waiting for the model behind other
    generations. What depends on the prompt (positions, patch coverage) or on a stored
    capture's contents is left to `resolve_interventions`, which checks everything again.
    """
    checked: list[InterventionSpec] = []
    for index, raw in enumerate(specs or ()):
        spec = parse_intervention(raw, index)
        hook = _site(info, native, spec, index)
        n_heads, width = _site_shape(info, hook.component)
        _check_heads_and_indices(spec, hook.hook_id, n_heads, width, index)
        if spec.op == "add":
            _add_operand(spec, hook.hook_id, n_heads, width, index)
        elif spec.values is not None:
            pieces = [(spec.values, 0)]
            if spec.op == "mean":
                _mean_operand(pieces, n_heads, width, index, "values", hook.hook_id)
            else:
                _patch_operand(pieces, n_heads, width, index, "values", hook.hook_id)
        checked.append(spec)
    return checked


def _check_patch_coverage(
    spec: InterventionSpec, length: int, start: int, prompt_len: int, n_positions: int, index: int, field: str
) -> None:
    end = start + length
    where = spec.positions
    if isinstance(where, tuple):
        outside = [p for p in where if not start <= p < end]
        if outside:
            raise _fail(index, "positions", f"the patch source covers positions {start}..{end - 1}; position {outside[0]} is outside it.")
        return
    lo, hi = {"all": (0, n_positions), "prompt": (0, prompt_len), "generated": (prompt_len, n_positions)}[where]
    if max(lo, start) >= min(hi, end):
        raise _fail(
            index, field,
            f"the patch source covers positions {start}..{end - 1}, none of the positions {where!r} ({lo}..{hi - 1}) of this run.",
        )


def resolve_capture_edits(kit: "ModelKit", specs: Iterable[Any]) -> tuple[list[ResolvedHook], dict[str, str]]:
    """Resolve activation hooks, reading each dict's optional `edit` ("before" or "after").

    `edit` says whether a capture at a site that an intervention also edits sees the
    tensor before or after the edit; the default is "after", what the rest of the model
    sees. Returns the hooks and {hook_id: label} for those that chose one.
    """
    clean: list[Any] = []
    chosen: dict[int, str] = {}
    for i, spec in enumerate(specs):
        if isinstance(spec, Mapping) and "edit" in spec:
            label = spec["edit"]
            if label not in ("before", "after"):
                raise HookSpecError(
                    f"activation_hooks[{i}]: 'edit' must be 'before' or 'after' (the capture sees the tensor before or after "
                    f"an intervention at the same hook), got {label!r}.",
                    param=f"activation_hooks[{i}].edit",
                )
            chosen[i] = label
            spec = {k: v for k, v in spec.items() if k != "edit"}
        clean.append(spec)
    resolved = resolve_hook_specs(kit.arch_info, clean, kit.native)
    labels: dict[str, str] = {}
    for i, label in chosen.items():
        for r in resolve_hook_specs(kit.arch_info, [clean[i]], kit.native):
            labels[r.hook_id] = label
    return resolved, labels


def describe_operations() -> dict[str, Any]:
    """The intervention vocabulary, JSON-ready, for API docs and client-side checks."""
    return {
        "ops": {op: {"required": list(r["required"]), "optional": list(r["optional"]), "source": r["source"]} for op, r in OPS.items()},
        "common_fields": [f for f in COMMON_FIELDS if f != "layer"],
        "source_fields": list(SOURCE_FIELDS),
        "positions": list(POSITION_SETS) + ["[int, ...]"],
        "components": [c.value for c in EDITABLE],
        "head_components": [c.value for c in HEAD_COMPONENTS],
    }


__all__ = [
    "InterventionError",
    "check_interventions",
    "InterventionRequest",
    "InterventionSpec",
    "ResolvedIntervention",
    "describe_operations",
    "parse_intervention",
    "resolve_capture_edits",
    "resolve_interventions",
]
