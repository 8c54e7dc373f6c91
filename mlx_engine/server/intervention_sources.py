"""Interventions on the wire: decoded and resolved once on the request thread; stored captures
bound as their sources on the engine thread.

- Request thread, numpy only: arrays decoded from JSON lists or the activation wire
  encoding, then `resolve_interventions` checks everything that needs only the model's
  shapes (hook names, heads, indices, vector shapes), and a `capture_id` must name a
  capture this server still holds, taken from the same model. A bad request is refused
  at once instead of after waiting behind other generations.
- Engine thread, just before generating: the stored captures are read back (MLX) and
  `bind_interventions` checks what depends on the prompt (positions, patch coverage).

Either way the client gets a 400 with code `invalid_intervention`: `InterventionError`
is mapped in errors.py.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..hooks.capture import Capture
from ..interventions.ops import BoundIntervention, bind_interventions
from ..interventions.resolve import ResolvedIntervention, resolve_interventions
from ..interventions.spec import intervention_error
from ..wire.codec import EncodingError, decode_array
from .capture_store import CaptureStore, StoredCapture
from .loaded_models import LoadedModel
from .schemas.hooks_and_edits import Intervention, WireArray


@dataclass(frozen=True)
class StoredActivations:
    """A stored capture read back: hook id -> its captures in step order (what a source reads)."""

    activations: dict[str, list[Capture]]


def decode_wire_array(value: Any, index: int, field: str) -> Any:
    """Nested lists pass through (the engine checks them); a wire object becomes float32 numpy."""
    if not isinstance(value, WireArray):
        return value
    encoding = value.encoding or ("base64" if isinstance(value.data, str) else "json")
    try:
        array = decode_array(value.data, value.shape, value.dtype, encoding)
    except binascii.Error as exc:
        raise intervention_error(index, field, f"'data' is not valid base64 ({exc}).") from None
    except (EncodingError, ValueError) as exc:
        raise intervention_error(index, field, f"{exc}.") from None
    assert array is not None  # "none" is not an accepted encoding here
    return array.astype(np.float32)


def _engine_spec(item: Intervention, index: int) -> dict[str, Any]:
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
    for name in ("scale", "indices", "heads", "min", "max", "k", "capture_id", "capture_hook"):
        value = getattr(item, name)
        if value is not None:
            spec[name] = value
    return spec


def stored_capture(store: CaptureStore, capture_id: str, model_id: str, index: int) -> StoredCapture:
    """The stored capture a `capture_id` names, if it exists and came from this request's model."""
    item = store.get(capture_id)
    if item is None:
        held = ", ".join(c.capture_id for c in store.list()) or "none"
        raise intervention_error(
            index, "capture_id",
            f"no stored capture {capture_id!r} (evicted, or never made by this server); stored captures: {held}.",
        )
    if item.model != model_id:
        raise intervention_error(
            index, "capture_id",
            f"capture {capture_id!r} was taken from model {item.model!r}; this request runs {model_id!r}.",
        )
    return item


def resolve_request_interventions(
    items: Optional[Sequence[Intervention]], model: LoadedModel, store: CaptureStore
) -> Optional[list[ResolvedIntervention]]:
    """A request's interventions, resolved once on the request thread (no MLX); None if none were sent.

    Reads only the model's `arch_info` and `native` flag, plain data fixed at load time.
    """
    if items is None:
        return None
    resolved = resolve_interventions(
        model.kit.arch_info, model.kit.native, [_engine_spec(item, index) for index, item in enumerate(items)]
    )
    for r in resolved:
        if r.spec.capture_id is not None:
            stored_capture(store, r.spec.capture_id, model.model_id, r.index)
    return resolved


def bind_request_interventions(
    resolved: Sequence[ResolvedIntervention], model: LoadedModel, prompt_len: int, max_tokens: int, store: CaptureStore
) -> list[BoundIntervention]:
    """Bind to the prompt, reading each stored capture once (engine thread: MLX)."""
    from ..wire.files import safetensors_to_captures

    sources: dict[str, StoredActivations] = {}
    for r in resolved:
        capture_id = r.spec.capture_id
        if capture_id is not None and capture_id not in sources:
            captures, _ = safetensors_to_captures(stored_capture(store, capture_id, model.model_id, r.index).data)
            sources[capture_id] = StoredActivations(captures)
    return bind_interventions(resolved, prompt_len=prompt_len, max_tokens=max_tokens, sources=sources)
