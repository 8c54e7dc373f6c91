"""Interventions on the wire: decoding, checks before queueing, and stored captures as sources.

A request's interventions are checked in two places, both before anything generates:

- on the request thread, with numpy only: types (pydantic), arrays decoded from JSON
  lists or from the activation wire encoding, every check that needs only the model's
  shapes (`check_interventions`: hook names, heads, indices, vector shapes), and that a
  `capture_id` names a capture this server still holds, taken from the same model. A bad
  request is refused at once instead of after waiting behind other generations.
- on the engine thread, just before generating: a stored capture's tensors are read
  back (MLX), and `resolve_interventions` checks what depends on the prompt (positions,
  patch coverage) and on the capture's contents.

Either way the client gets a 400 with code `invalid_intervention`: `InterventionError`
is mapped in errors.py.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..encoding import EncodingError, decode_array, safetensors_to_captures
from ..hooks import Capture
from ..interventions import InterventionError, ResolvedIntervention, check_interventions, resolve_interventions
from .capture_store import CaptureStore, StoredCapture
from .registry import LoadedModel
from .schemas import Intervention, WireArray

# Wire-only fields: the engine's spec names its source differently (see `engine_specs`).
_CAPTURE_HOOK = "capture_hook"

WireSpecs = tuple[dict[str, Any], ...]


def _error(index: int, field: Optional[str], message: str) -> InterventionError:
    param = f"interventions[{index}]" + (f".{field}" if field else "")
    return InterventionError(f"{param}: {message}", param=param)


@dataclass(frozen=True)
class StoredActivations:
    """A stored capture read back: hook id -> its captures in step order.

    It has the `activations` mapping of a CacheResult, which is what
    `resolve_interventions` accepts as a `source`.
    """

    activations: dict[str, list[Capture]]


def decode_wire_array(value: Any, index: int, field: str) -> Any:
    """Nested lists pass through (the engine checks them); a wire object becomes float32 numpy."""
    if not isinstance(value, WireArray):
        return value
    encoding = value.encoding or ("base64" if isinstance(value.data, str) else "json")
    try:
        array = decode_array(value.data, value.shape, value.dtype, encoding)
    except binascii.Error as exc:
        raise _error(index, field, f"'data' is not valid base64 ({exc}).") from None
    except (EncodingError, ValueError) as exc:
        raise _error(index, field, f"{exc}.") from None
    assert array is not None  # "none" is not an accepted encoding here
    return array.astype(np.float32)


def to_engine(item: Intervention, index: int) -> dict[str, Any]:
    """The engine's dict for one validated request item: arrays decoded, unset fields left out."""
    spec: dict[str, Any] = {"layer_name": item.layer_name, "op": item.op, "positions": item.positions}
    if item.component is not None:
        spec["component"] = item.component
    if item.capture_input:
        spec["capture_input"] = True
    for name in ("vector", "values"):
        value = getattr(item, name)
        if value is not None:
            spec[name] = decode_wire_array(value, index, name)
    for name in ("scale", "indices", "heads", "min", "max", "capture_id", _CAPTURE_HOOK):
        value = getattr(item, name)
        if value is not None:
            spec[name] = value
    return spec


def stored_capture(store: CaptureStore, capture_id: str, model_id: str, index: int) -> StoredCapture:
    """The stored capture a `capture_id` names, if it exists and came from this request's model."""
    item = store.get(capture_id)
    if item is None:
        held = ", ".join(c.capture_id for c in store.list()) or "none"
        raise _error(
            index, "capture_id",
            f"no stored capture {capture_id!r} (evicted, or never made by this server); stored captures: {held}.",
        )
    if item.model != model_id:
        raise _error(
            index, "capture_id",
            f"capture {capture_id!r} was taken from model {item.model!r}; this request runs {model_id!r}.",
        )
    return item


def _engine_view(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without wire-only fields, for the engine's model-free and shape checks."""
    return {k: v for k, v in spec.items() if k != _CAPTURE_HOOK}


def prepare_interventions(
    items: Optional[Sequence[Intervention]], model: LoadedModel, store: CaptureStore
) -> Optional[WireSpecs]:
    """Decode and check a request's interventions on the request thread (no MLX); None if none were sent.

    Reads only the model's `arch_info` and `native` flag, plain data fixed at load time.
    """
    if items is None:
        return None
    specs = tuple(to_engine(item, index) for index, item in enumerate(items))
    check_interventions(model.kit.arch_info, model.kit.native, [_engine_view(s) for s in specs])
    for index, spec in enumerate(specs):
        if spec.get(_CAPTURE_HOOK) is not None and spec.get("capture_id") is None:
            raise _error(index, _CAPTURE_HOOK, "'capture_hook' names a hook inside a stored capture; give 'capture_id' too.")
        if spec.get("capture_id") is not None:
            stored_capture(store, spec["capture_id"], model.model_id, index)
    return specs


def engine_specs(specs: WireSpecs, model_id: str, store: CaptureStore) -> list[dict[str, Any]]:
    """The specs with each `capture_id` replaced by the stored capture's tensors (engine thread: MLX).

    A capture referenced by several interventions is read once. The engine reads the
    hook named by `capture_hook` (as its `capture_id` within the source), or by default
    the intervention's own hook id.
    """
    loaded: dict[str, StoredActivations] = {}
    out: list[dict[str, Any]] = []
    for index, wire in enumerate(specs):
        spec = _engine_view(wire)
        capture_id = spec.pop("capture_id", None)
        if capture_id is not None:
            if capture_id not in loaded:
                captures, _ = safetensors_to_captures(stored_capture(store, capture_id, model_id, index).data)
                loaded[capture_id] = StoredActivations(captures)
            source = loaded[capture_id]
            hook = wire.get(_CAPTURE_HOOK)
            if hook is not None:
                if hook not in source.activations:
                    held = ", ".join(sorted(source.activations)) or "nothing"
                    raise _error(index, _CAPTURE_HOOK, f"capture {capture_id!r} holds no hook {hook!r}; it holds: {held}.")
                spec["capture_id"] = hook
            spec["source"] = source
        out.append(spec)
    return out


def resolve_for_run(
    specs: WireSpecs, model: LoadedModel, prompt_len: int, max_tokens: int, store: CaptureStore
) -> list[ResolvedIntervention]:
    """Every intervention checked against the prompt and bound to its site (engine thread)."""
    return resolve_interventions(
        model.kit, engine_specs(specs, model.model_id, store), prompt_len=prompt_len, max_tokens=max_tokens
    )


def applied(resolved: Sequence[ResolvedIntervention], specs: WireSpecs) -> list[dict[str, Any]]:
    """What each intervention did, JSON-ready, with the stored capture it read from (if any)."""
    out = []
    for edit, wire in zip(resolved, specs):
        meta = edit.metadata()
        for name in ("capture_id", _CAPTURE_HOOK):
            if wire.get(name) is not None:
                meta[name] = wire[name]
        out.append(meta)
    return out
