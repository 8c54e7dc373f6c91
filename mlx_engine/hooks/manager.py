"""Arming hook points, collecting each pass's captures, and describing what a model offers."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from ..models.base import ArchitectureInfo
from .capture import Capture
from .components import ComponentType
from .hook_point import HookPoint
from .spec import (
    ActivationHookSpec,
    HookSpecError,
    ResolvedHook,
    offered_components,
    resolve_hook_specs,
)

if TYPE_CHECKING:
    from ..interventions import ResolvedIntervention
    from ..model_kit import ModelKit

C = ComponentType
HookRequest = Union[ActivationHookSpec, dict[str, Any], str]


class CaptureBudgetError(ValueError):
    """A request would capture more bytes than the configured budget allows."""

    def __init__(self, estimate_bytes: int, budget_bytes: int) -> None:
        super().__init__(
            f"This request would capture about {estimate_bytes / 2**20:.1f} MiB of activations "
            f"({estimate_bytes} bytes), over the capture budget of {budget_bytes / 2**20:.1f} MiB "
            f"({budget_bytes} bytes). Ask for fewer hooks, layers or tokens."
        )
        self.estimate_bytes = estimate_bytes
        self.budget_bytes = budget_bytes


class HookBusyError(RuntimeError):
    """The model's hook points are armed by another capture session."""


def model_hook_points(kit: "ModelKit") -> dict[str, HookPoint]:
    return kit.hook_points


def row_shape(info: ArchitectureInfo, component: ComponentType) -> list[Union[int, str]]:
    """Shape of one pass's capture, with T (new positions) and S (keys) symbolic."""
    if component in (C.QUERY, C.Z):
        return [info.n_heads, "T", info.head_dim]
    if component in (C.KEY, C.VALUE):
        return [info.n_kv_heads, "T", info.head_dim]
    if component in (C.ATTENTION_SCORES, C.ATTENTION_PATTERN):
        return [info.n_heads, "T", "S"]
    if component is C.ROUTER:
        return ["T", info.n_experts]
    return ["T", info.d_model]


def _width(info: ArchitectureInfo, component: ComponentType) -> int:
    """Elements per new position, for everything but scores and patterns."""
    if component in (C.QUERY, C.Z):
        return info.n_heads * info.head_dim
    if component in (C.KEY, C.VALUE):
        return info.n_kv_heads * info.head_dim
    if component is C.ROUTER:
        return info.n_experts + 2 * (info.experts_per_token or 0)
    return info.d_model


def estimate_capture_bytes(
    kit: "ModelKit", specs: Iterable[HookRequest], prompt_len: int, max_tokens: int
) -> int:
    """Bytes a generation would capture: prompt pass plus max_tokens - 1 decode passes."""
    info = kit.arch_info
    resolved = resolve_hook_specs(info, specs, kit.native)
    return _estimate(info, resolved, prompt_len, max_tokens, _param_itemsize(kit))


def _param_itemsize(kit: "ModelKit") -> int:
    """Bytes per activation element: the model's float dtype (quantized scales included)."""
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(kit.model.parameters()):
        if v.dtype in (mx.float32, mx.float16, mx.bfloat16):
            return v.dtype.size
    return 4


def _estimate(info: ArchitectureInfo, resolved: Sequence[ResolvedHook], prompt_len: int, max_tokens: int, itemsize: int) -> int:
    rows = prompt_len + max(max_tokens - 1, 0)
    total = 0
    for r in resolved:
        if r.component in (C.ATTENTION_SCORES, C.ATTENTION_PATTERN):
            window = info.sliding_window if r.layer is not None and info.layer_types and info.layer_types[r.layer] == "sliding_attention" else None
            keys = prompt_len * prompt_len
            for k in range(1, max_tokens):
                s = prompt_len + k
                keys += min(s, window) if window else s
            total += info.n_heads * keys * 4  # scores and patterns are float32
        else:
            total += rows * _width(info, r.component) * itemsize
    return total


@dataclass
class _PassState:
    step: int
    start: int
    end: int


class CaptureSession:
    """Arms the sites a request needs and collects captures pass by pass.

    Used by the generation loop through `begin_pass`/`end_pass`; the captures of a
    pass are lazy arrays that the loop evaluates together with that pass's logits.
    A site that an intervention edits runs a chain: captures labelled "before", the
    edits in request order, then the other captures (labelled "after"); a site with
    captures only keeps the plain recorder.
    """

    def __init__(
        self,
        kit: "ModelKit",
        resolved: Sequence[ResolvedHook],
        interventions: Sequence["ResolvedIntervention"] = (),
        capture_edits: Optional[dict[str, str]] = None,
    ) -> None:
        self.kit = kit
        self.resolved = list(resolved)
        points = model_hook_points(kit)
        # Keyed by HookPoint identity: one point may serve two sites (a fallback model's
        # block-0 input is both `embedding` and `layers.0.resid_pre`).
        self._armed: dict[int, HookPoint] = {}
        self._by_point: dict[int, list[ResolvedHook]] = {}
        for r in self.resolved:
            point = points[r.site]
            self._armed[id(point)] = point
            self._by_point.setdefault(id(point), []).append(r)
        self._edits: dict[int, list["ResolvedIntervention"]] = {}
        for edit in interventions:
            point = points[edit.site]
            self._armed[id(point)] = point
            self._edits.setdefault(id(point), []).append(edit)
        labels = capture_edits or {}
        self._before: dict[int, list[ResolvedHook]] = {}
        self._after: dict[int, list[ResolvedHook]] = {}
        for key in self._edits:
            for r in self._by_point.get(key, []):
                side = self._before if labels.get(r.hook_id, "after") == "before" else self._after
                side.setdefault(key, []).append(r)
        self._pass: Optional[_PassState] = None
        self._buffer: list[Capture] = []

    def _record(self, hp: HookPoint, x: mx.array, context: dict[str, Any]) -> mx.array:
        state = self._pass
        if state is None:  # a forward outside a bracketed pass (e.g. a warm-up): not ours to keep
            return x
        self._collect(self._by_point[id(hp)], x, context, state, None)
        return x

    def _edit(self, hp: HookPoint, x: mx.array, context: dict[str, Any]) -> mx.array:
        state = self._pass
        if state is None:
            return x
        key = id(hp)
        self._collect(self._before.get(key, ()), x, context, state, "before")
        for edit in self._edits[key]:
            x = edit.apply(x, state.start, state.end)
        self._collect(self._after.get(key, ()), x, context, state, "after")
        return x

    def _collect(
        self, hooks: Iterable[ResolvedHook], x: mx.array, context: dict[str, Any], state: _PassState, edit: Optional[str]
    ) -> None:
        for r in hooks:
            extras: dict[str, mx.array] = {}
            if r.component is C.ROUTER:
                extras = {"experts": context["experts"][0], "weights": context["weights"][0]}
            self._buffer.append(
                Capture(
                    hook_id=r.hook_id,
                    layer_name=r.layer_name,
                    layer=r.layer,
                    component=r.component.value,
                    step=state.step,
                    positions=(state.start, state.end),
                    is_input=r.is_input,
                    array=x[0],
                    key_positions=context.get("key_positions"),
                    extras=extras,
                    edit=edit,
                )
            )

    def arm(self) -> None:
        for point in self._armed.values():
            if point.fn is not None:
                raise HookBusyError(
                    f"Hook point {point.name} is already armed by another capture session on this model; "
                    "finish or close that generator first."
                )
        for key, point in self._armed.items():
            point.fn = self._edit if key in self._edits else self._record

    def disarm(self) -> None:
        for point in self._armed.values():
            if point.fn == self._record or point.fn == self._edit:
                point.fn = None

    def begin_pass(self, step: int, start: int, end: int) -> None:
        self._pass = _PassState(step, start, end)
        self._buffer = []

    def end_pass(self) -> list[Capture]:
        captures, self._buffer, self._pass = self._buffer, [], None
        return captures


class ActivationHookManager:
    """The hooks registered for a model, and what the model offers."""

    def __init__(self, kit: "ModelKit") -> None:
        self.kit = kit
        self._hooks: dict[str, ResolvedHook] = {}

    def register_hook(self, spec: HookRequest) -> list[str]:
        """Validate and keep a hook; returns the hook id(s) it captures under."""
        resolved = resolve_hook_specs(self.kit.arch_info, [spec], self.kit.native)
        for r in resolved:
            if r.hook_id in self._hooks:
                raise HookSpecError(f"Hook id {r.hook_id!r} is already registered; unregister it first.")
        for r in resolved:
            self._hooks[r.hook_id] = r
        return [r.hook_id for r in resolved]

    def unregister_hook(self, hook_id: str) -> None:
        if hook_id not in self._hooks:
            raise KeyError(f"No hook {hook_id!r} is registered; registered: {sorted(self._hooks)}.")
        del self._hooks[hook_id]

    def clear_all_hooks(self) -> None:
        self._hooks.clear()

    def list_hooks(self) -> list[dict[str, Any]]:
        return [
            {
                "hook_id": r.hook_id,
                "layer_name": r.layer_name,
                "layer": r.layer,
                "component": r.component.value,
                "is_input": r.is_input,
            }
            for r in self._hooks.values()
        ]

    @property
    def resolved_hooks(self) -> list[ResolvedHook]:
        return list(self._hooks.values())

    def hook_points(self) -> dict[str, Any]:
        return describe_hook_points(self.kit)

    @contextmanager
    def session(self, specs: Optional[Iterable[HookRequest]] = None) -> Iterator[CaptureSession]:
        resolved = (
            resolve_hook_specs(self.kit.arch_info, specs, self.kit.native) if specs is not None else self.resolved_hooks
        )
        session = CaptureSession(self.kit, resolved)
        session.arm()
        try:
            yield session
        finally:
            session.disarm()


def describe_hook_points(kit: "ModelKit") -> dict[str, Any]:
    """A JSON-ready listing of every hook point: layers, components, shapes, aliases."""
    info = kit.arch_info
    offered = offered_components(info, kit.native)
    per_layer = [c for c in offered if c is not C.EMBEDDING]
    inputs = {C.RESIDUAL, C.ATTENTION, C.MLP, C.LAYERNORM}
    layers = []
    for i in range(info.num_layers):
        layer_type = info.layer_types[i] if info.layer_types else "full_attention"
        layers.append(
            {
                "layer": i,
                "name": f"layers.{i}",
                "aliases": [f"{info.block_prefix}.{i}", f"blocks.{i}", str(i)],
                "attention_type": layer_type,
                "window": info.sliding_window if layer_type == "sliding_attention" else None,
                "components": {
                    c.value: {
                        "hook_id": f"layers.{i}.{c.value}",
                        "shape": row_shape(info, c),
                        "supports_input": c in inputs,
                    }
                    for c in per_layer
                },
            }
        )
    return {
        "model": kit.model_id,
        "model_type": kit.model_type,
        "native": kit.native,
        "num_layers": info.num_layers,
        "d_model": info.d_model,
        "n_heads": info.n_heads,
        "n_kv_heads": info.n_kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": info.vocab_size,
        "n_experts": info.n_experts,
        "experts_per_token": info.experts_per_token,
        "sliding_window": info.sliding_window,
        "components": [c.value for c in offered],
        "embedding": {"hook_id": "embedding", "shape": ["T", info.d_model]},
        "final_norm": {"hook_id": "final_norm", "component": "layernorm", "shape": ["T", info.d_model]},
        "layers": layers,
        "shape_symbols": {"T": "new positions in the pass", "S": "key positions attended (see key_positions)"},
    }
