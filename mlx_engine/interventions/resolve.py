"""Interventions checked against a model's shapes, once, with numpy alone.

`resolve_interventions` binds each request to its hook site and checks every field
that depends only on the model (hook name, heads, indices, vector and `values` shapes).
It needs no MLX and no prompt, so a server runs it on the request thread and the engine
thread only binds what depends on the prompt (`ops.bind_interventions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from ..hooks.architecture import ArchitectureInfo
from ..hooks.components import EDITABLE_COMPONENTS, EXPERT_COMPONENTS, HEAD_COMPONENTS, position_shape
from ..hooks.names import HookSpecError, ResolvedHook, resolve_hooks
from .spec import InterventionSpec, intervention_error, parse_intervention

Piece = tuple[np.ndarray, int]  # rows of a source, and the absolute position of its first row


@dataclass(frozen=True, eq=False)
class ResolvedIntervention:
    """One intervention bound to its site, with the operands its request carried (numpy)."""

    hook: ResolvedHook
    spec: InterventionSpec
    index: int
    n_heads: int  # 0 for [B, T, d] sites
    width: int  # d, or head_dim for [B, H, T, D] sites
    operand: Optional[np.ndarray] = None  # add: scale * vector; mean/patch from `values`

    @property
    def site(self) -> str:
        return self.hook.site

    @property
    def op(self) -> str:
        return self.spec.op

    @property
    def layout(self) -> str:
        """How the site's tensor is laid out: "tokens" [B, T, d], "heads" [B, H, T, D], "experts" [B, T, k, d]."""
        if self.hook.component in HEAD_COMPONENTS:
            return "heads"
        if self.hook.component in EXPERT_COMPONENTS:
            return "experts"
        return "tokens"

    @property
    def needs_source(self) -> bool:
        """Whether its operand comes from a capture read at bind time (`source` or `capture_id`)."""
        return self.spec.op in ("mean", "patch") and self.operand is None

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
        for key in ("scale", "min", "max", "k"):
            if getattr(s, key) is not None:
                meta[key] = getattr(s, key)
        for key in ("indices", "heads"):
            if getattr(s, key) is not None:
                meta[key] = list(getattr(s, key))
        return meta


def shape_text(n_heads: int, width: int, rows: Optional[str] = None) -> str:
    parts = ([str(n_heads)] if n_heads else []) + ([rows] if rows else []) + [str(width)]
    return "[" + ", ".join(parts) + "]"


def check_rows(arr: np.ndarray, n_heads: int, width: int, index: int, field: str, what: str) -> None:
    expected_ndim = 3 if n_heads else 2
    ok = arr.ndim == expected_ndim and arr.shape[-1] == width and (not n_heads or arr.shape[0] == n_heads)
    if not ok:
        raise intervention_error(index, field, f"{what} must have shape {shape_text(n_heads, width, 'T')}, got {list(arr.shape)}.")


def mean_operand(pieces: list[Piece], n_heads: int, width: int, index: int, field: str, site: str) -> np.ndarray:
    """The mean vector: given as one position's shape, or averaged over every row of the pieces."""
    one = (n_heads, width) if n_heads else (width,)
    if len(pieces) == 1 and pieces[0][0].shape == one:
        return pieces[0][0]
    rows = []
    for arr, _ in pieces:
        if arr.shape == one:
            rows.append(arr[..., None, :])
            continue
        check_rows(arr, n_heads, width, index, field, f"the mean source for {site} (a mean vector {list(one)}, or captures)")
        rows.append(arr)
    axis = 1 if n_heads else 0
    return np.concatenate(rows, axis=axis).mean(axis=axis, dtype=np.float64).astype(np.float32)


def patch_operand(pieces: list[Piece], n_heads: int, width: int, index: int, field: str, site: str) -> Piece:
    """The patch rows (contiguous pieces joined) and the absolute position of the first."""
    axis = 1 if n_heads else 0
    expected = pieces[0][1]
    for arr, first in pieces:
        check_rows(arr, n_heads, width, index, field, f"the patch source for {site}")
        if first != expected:
            raise intervention_error(index, field, f"the patch source's captures are not contiguous: one starts at position {first}, expected {expected}.")
        expected = first + arr.shape[axis]
    return np.concatenate([a for a, _ in pieces], axis=axis), pieces[0][1]


def _site(info: ArchitectureInfo, native: bool, spec: InterventionSpec, index: int) -> ResolvedHook:
    request = {
        "layer_name": spec.layer_name,
        "component": spec.component,
        "capture_input": spec.capture_input,
        "capture_output": not spec.capture_input,
    }
    try:
        (hook,) = resolve_hooks(info, native, [request])
    except HookSpecError as exc:
        message = str(exc).removeprefix("activation_hooks[0]: ")
        about_component = message.startswith(("Unknown component", "Component ", "No component", "The embedding offers", "The final norm offers"))
        raise intervention_error(index, "component" if about_component else "layer_name", message) from None
    if hook.component not in EDITABLE_COMPONENTS:
        valid = ", ".join(c.value for c in EDITABLE_COMPONENTS)
        raise intervention_error(index, "component", f"component {hook.component.value!r} cannot be edited; interventions act on: {valid}.")
    return hook


def _check_heads_and_indices(spec: InterventionSpec, site: str, n_heads: int, width: int, index: int, component: Any) -> None:
    if component in EXPERT_COMPONENTS and spec.op in ("mean", "patch"):
        raise intervention_error(
            index, "op",
            f"op {spec.op!r} cannot act on {site}: its rows are the experts each token was routed to, which differ "
            "between runs, so a stored row has no matching slot (use zero, clamp, scale, add or topk).",
        )
    if spec.k is not None and spec.k > width:
        raise intervention_error(index, "k", f"k = {spec.k} is more than the {width} features per position of {site}.")
    if spec.heads is not None:
        if component not in HEAD_COMPONENTS:
            raise intervention_error(index, "heads", f"'heads' applies to query, key, value and z; {site} has no head axis (use 'indices').")
        if not n_heads:
            raise intervention_error(index, "heads", f"'heads' applies to query, key, value and z; {site} has no head axis (use 'indices').")
        if spec.heads[-1] >= n_heads:
            raise intervention_error(index, "heads", f"head {spec.heads[-1]} is out of range: {site} has {n_heads} heads (0..{n_heads - 1}).")
    if spec.indices is not None and spec.indices[-1] >= width:
        unit = "per head" if n_heads else "per position"
        raise intervention_error(index, "indices", f"index {spec.indices[-1]} is out of range: {site} has {width} features {unit} (0..{width - 1}).")


def _add_operand(spec: InterventionSpec, site: str, n_heads: int, width: int, index: int) -> np.ndarray:
    """scale * vector in one position's shape (a [head_dim] vector repeated over the heads)."""
    vec = spec.vector
    assert vec is not None
    if n_heads and vec.shape == (width,):
        vec = np.broadcast_to(vec, (n_heads, width))
    expected = (n_heads, width) if n_heads else (width,)
    if vec.shape != expected:
        also = f" or [{width}] (added to each chosen head)" if n_heads else ""
        raise intervention_error(index, "vector", f"vector for {site} must have shape {list(expected)}{also}, got {list(spec.vector.shape)}.")
    return (vec * np.float32(1.0 if spec.scale is None else spec.scale)).astype(np.float32)


def resolve_one(info: ArchitectureInfo, native: bool, spec: InterventionSpec, index: int) -> ResolvedIntervention:
    """One parsed intervention checked against the model's shapes, its request operands built."""
    hook = _site(info, native, spec, index)
    n_heads, width = position_shape(info, hook.component)
    site = hook.hook_id
    _check_heads_and_indices(spec, site, n_heads, width, index, hook.component)
    operand: Optional[np.ndarray] = None
    if spec.op == "add":
        operand = _add_operand(spec, site, n_heads, width, index)
    elif spec.values is not None:
        pieces = [(spec.values, 0)]
        if spec.op == "mean":
            operand = mean_operand(pieces, n_heads, width, index, "values", site)
        else:
            operand = patch_operand(pieces, n_heads, width, index, "values", site)[0]
    return ResolvedIntervention(hook, spec, index, n_heads, width, operand)


InterventionRequest = Union[InterventionSpec, Mapping[str, Any], ResolvedIntervention, Any]


def resolve_interventions(
    info: ArchitectureInfo, native: bool, specs: Optional[Iterable[InterventionRequest]]
) -> list[ResolvedIntervention]:
    """Parse and check interventions against a model's shapes; raise InterventionError on the first bad one.

    Already-resolved (or bound) interventions pass through.
    """
    out: list[ResolvedIntervention] = []
    for index, raw in enumerate(specs or ()):
        if isinstance(raw, ResolvedIntervention) or hasattr(raw, "resolved"):
            out.append(raw)
            continue
        out.append(resolve_one(info, native, parse_intervention(raw, index), index))
    return out
