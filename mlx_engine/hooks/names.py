"""Hook requests and how their names resolve to capture sites: the one place a hook is resolved.

A request names a layer (`5`, `layers.5`, `model.layers.5`, `transformer.h.5`,
`blocks.5`, a module path such as `model.layers.5.self_attn`) and a component, or
gives a TransformerLens hook name (`blocks.5.attn.hook_pattern`) that implies both.
Each request resolves to a site of the model's code (see models/base.py) and a hook id,
once: a `ResolvedHook` passes through `resolve_hooks` unchanged, so the server resolves
on the request thread and the engine only arms what it is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Optional, Union

from .architecture import ArchitectureInfo
from .aliases import (
    BLOCK_SITE_OF,
    EMBEDDING_NAMES,
    FINAL_NORM_NAMES,
    LAYER_PREFIXES,
    MODULE_SUFFIXES,
    TRANSFORMERLENS_BLOCK_ALIASES,
)
from .components import (
    EXPERT_COMPONENTS,
    MODULE_COMPONENTS,
    NEURON_COMPONENTS,
    POST_NORM_COMPONENTS,
    ComponentType,
    position_shape,
)


class HookSpecError(ValueError):
    """An activation hook request that names no valid hook point; says what is valid."""

    def __init__(self, message: str, param: str = "activation_hooks") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ActivationHookSpec:
    """A request to capture `component` of `layer_name` (its output, input, or both)."""

    layer_name: Union[str, int]
    component: Optional[Union[str, ComponentType]] = None
    hook_id: Optional[str] = None
    capture_input: bool = False
    capture_output: bool = True
    # Where an intervention edits the same site: capture "before" or "after" (default) the edit.
    edit: Optional[str] = None
    # Capture only these features of the last axis (e.g. 20 chosen neurons of an MLP).
    indices: Optional[tuple[int, ...]] = None
    # Capture only these absolute token positions ("last": the last position of each pass).
    positions: Optional[Union[str, tuple[int, ...]]] = None
    # Capture in this dtype (float16, bfloat16, float32) instead of the model's.
    dtype: Optional[str] = None

    @classmethod
    def from_any(cls, spec: "HookRequest") -> "ActivationHookSpec":
        """A spec from a dict, a name, or any object with the spec's attributes (a request schema)."""
        if isinstance(spec, ActivationHookSpec):
            return spec
        if isinstance(spec, str):
            return cls(layer_name=spec)
        if not isinstance(spec, dict):
            if hasattr(spec, "layer_name"):
                component = getattr(spec, "component", None)
                return cls(
                    layer_name=spec.layer_name,
                    component=component.value if isinstance(component, Enum) else component,
                    hook_id=getattr(spec, "hook_id", None),
                    capture_input=getattr(spec, "capture_input", False),
                    capture_output=getattr(spec, "capture_output", True),
                    edit=getattr(spec, "edit", None),
                    indices=_indices(getattr(spec, "indices", None)),
                    positions=_positions(getattr(spec, "positions", None)),
                    dtype=_dtype(getattr(spec, "dtype", None)),
                )
            raise HookSpecError(f"A hook spec is a dict like {{'layer_name': 5, 'component': 'residual'}}, got {spec!r}.")
        unknown = set(spec) - {
            "layer_name", "component", "hook_id", "capture_input", "capture_output", "layer", "edit", "indices", "positions", "dtype"
        }
        if unknown:
            raise HookSpecError(
                f"Unknown hook spec field(s) {sorted(unknown)}; valid: layer_name, component, hook_id, "
                "capture_input, capture_output, edit, indices, positions, dtype."
            )
        if spec.get("edit") not in (None, "before", "after"):
            raise HookSpecError(
                f"'edit' must be 'before' or 'after' (the capture sees the tensor before or after an intervention "
                f"at the same hook), got {spec['edit']!r}.",
                param="edit",
            )
        layer_name = spec.get("layer_name", spec.get("layer"))
        if layer_name is None:
            raise HookSpecError("A hook spec needs 'layer_name' (e.g. 5, 'model.layers.5', 'embedding').")
        for flag in ("capture_input", "capture_output"):
            if flag in spec and not isinstance(spec[flag], bool):
                raise HookSpecError(f"'{flag}' must be true or false, got {spec[flag]!r}.")
        if spec.get("hook_id") is not None and not isinstance(spec["hook_id"], str):
            raise HookSpecError(f"'hook_id' must be a string, got {spec['hook_id']!r}.")
        return cls(
            layer_name=layer_name,
            component=spec.get("component"),
            hook_id=spec.get("hook_id"),
            capture_input=spec.get("capture_input", False),
            capture_output=spec.get("capture_output", True),
            edit=spec.get("edit"),
            indices=_indices(spec.get("indices")),
            positions=_positions(spec.get("positions")),
            dtype=_dtype(spec.get("dtype")),
        )


CAPTURE_DTYPES = ("float32", "float16", "bfloat16")


def _positions(value: Any) -> Optional[Union[str, tuple[int, ...]]]:
    """A position subset: "last", or distinct absolute token positions (sorted)."""
    if value is None or value == "last":
        return value
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise HookSpecError(f"'positions' must be 'last' or a list of token positions, got {value!r}.", param="positions")
    items = list(value)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise HookSpecError(f"'positions' must be 'last' or a non-empty list of positions >= 0, got {value!r}.", param="positions")
    if len(set(items)) != len(items):
        raise HookSpecError("'positions' repeats a position; give each once.", param="positions")
    return tuple(sorted(items))


def _dtype(value: Any) -> Optional[str]:
    if value is None:
        return None
    if value not in CAPTURE_DTYPES:
        raise HookSpecError(f"'dtype' must be one of {', '.join(CAPTURE_DTYPES)}, got {value!r}.", param="dtype")
    return value


def _indices(value: Any) -> Optional[tuple[int, ...]]:
    """A feature subset: distinct non-negative integers, kept in the order given."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise HookSpecError(f"'indices' must be a list of integers, got {value!r}.", param="indices")
    items = list(value)
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise HookSpecError(f"'indices' must be a non-empty list of integers >= 0, got {value!r}.", param="indices")
    if len(set(items)) != len(items):
        raise HookSpecError("'indices' repeats an index; give each feature once.", param="indices")
    return tuple(items)


@dataclass(frozen=True)
class ResolvedHook:
    """One capture: hook id, the site in the model code, and its wire metadata."""

    hook_id: str
    site: str  # HookPoint name: "embedding", "final_norm" or "layers.{i}.{site}"
    layer: Optional[int]
    layer_name: str  # canonical: "layers.{i}", "embedding" or "final_norm"
    component: ComponentType
    is_input: bool
    # Where an intervention edits the same site: "before" or "after" (None: after, the default).
    edit: Optional[str] = None
    # The features of the last axis captured (None: all).
    indices: Optional[tuple[int, ...]] = None
    # The token positions captured: "last" of each pass, absolute positions, or None for all.
    positions: Optional[Union[str, tuple[int, ...]]] = None
    # The dtype captures are cast to (None: the model's).
    dtype: Optional[str] = None

    def listing(self) -> dict[str, Any]:
        """The registered-hook listing entry (GET /v1/activations/hooks)."""
        return {
            "hook_id": self.hook_id,
            "layer_name": self.layer_name,
            "layer": self.layer,
            "component": self.component.value,
            "is_input": self.is_input,
        }


HookRequest = Union[ActivationHookSpec, ResolvedHook, dict[str, Any], str, Any]

C = ComponentType

_LAYER_RE = re.compile(r"^(\d+)(?:\.(.+))?$")


def _component(value: Union[str, ComponentType, None], valid: Iterable[ComponentType]) -> Optional[ComponentType]:
    if value is None:
        return None
    try:
        return ComponentType(value)
    except ValueError:
        names = ", ".join(c.value for c in valid)
        raise HookSpecError(f"Unknown component {value!r}; valid components for this model: {names}.") from None


def valid_names_hint(info: ArchitectureInfo) -> str:
    last = info.num_layers - 1
    return (
        f"valid layer names: 0..{last}, 'layers.N', 'model.layers.N', 'transformer.h.N', 'blocks.N' "
        f"(N in 0..{last}), 'embedding', 'final_norm', or TransformerLens names such as "
        f"'blocks.N.hook_resid_post', 'blocks.N.attn.hook_pattern', 'hook_embed'"
    )


def _parse_layer(
    name: Union[str, int], info: ArchitectureInfo, offered: tuple[ComponentType, ...] = ()
) -> tuple[Optional[int], Optional[str], Optional[tuple[ComponentType, bool]], Optional[ComponentType]]:
    """(layer index or None, 'embedding'/'final_norm'/None, component implied by a TL alias,
    component a module path suggests when the spec names none)."""
    if isinstance(name, bool):
        raise HookSpecError(f"Layer name {name!r} is not a layer; {valid_names_hint(info)}.")
    if isinstance(name, int):
        return name, None, None, None
    if not isinstance(name, str):
        raise HookSpecError(f"Layer name must be a string or an integer, got {name!r}.")
    text = name.strip()
    if text in EMBEDDING_NAMES:
        return None, "embedding", (C.EMBEDDING, False) if text == "hook_embed" else None, None
    if text in FINAL_NORM_NAMES:
        implied = (C.LAYERNORM, False) if text in ("ln_final.hook_normalized", "final_norm") else None
        return None, "final_norm", implied, None
    rest = text
    for prefix in LAYER_PREFIXES:
        if text.startswith(prefix):
            rest = text[len(prefix) :]
            break
    match = _LAYER_RE.match(rest)
    if not match:
        raise HookSpecError(f"Unknown layer name {name!r}; {valid_names_hint(info)}.")
    layer, suffix = int(match.group(1)), match.group(2)
    if suffix is None:
        return layer, None, None, None
    if suffix in MODULE_SUFFIXES:
        return layer, None, None, MODULE_SUFFIXES[suffix]
    if suffix in TRANSFORMERLENS_BLOCK_ALIASES:
        return layer, None, TRANSFORMERLENS_BLOCK_ALIASES[suffix], None
    try:  # a canonical hook id used as a name: "layers.5.residual"
        return layer, None, (ComponentType(suffix), False), None
    except ValueError:
        if "." not in suffix and not suffix.startswith("hook_"):
            names = ", ".join(c.value for c in offered)
            raise HookSpecError(f"Unknown component {suffix!r} in {name!r}; valid components for this model: {names}.") from None
        raise HookSpecError(f"Unknown hook name {name!r}; {valid_names_hint(info)}.") from None


def supports_input(component: ComponentType, offered: tuple[ComponentType, ...]) -> bool:
    """Whether the input of `component` has a site: the attention input is the pre-attention norm's output,
    which a fallback (mlx-lm) block without such a norm (OLMo-style sandwich norms) does not have."""
    owner = C.LAYERNORM if component is C.ATTENTION else component
    return (component, True) in BLOCK_SITE_OF and owner in offered


def offered_components(info: ArchitectureInfo, native: bool) -> tuple[ComponentType, ...]:
    """Components this model's code can capture."""
    if info.offered is not None:
        return tuple(ComponentType(c) for c in info.offered)
    if not native:
        return MODULE_COMPONENTS
    moe_only = (C.ROUTER, *EXPERT_COMPONENTS)
    conditional = (*moe_only, *NEURON_COMPONENTS, *POST_NORM_COMPONENTS, C.SAE_FEATURES)
    comps = [c for c in ComponentType if c not in conditional]
    comps.extend(moe_only if info.n_experts else NEURON_COMPONENTS)
    if info.post_norms:
        comps.extend(POST_NORM_COMPONENTS)
    return tuple(comps)


def resolve_hooks(info: ArchitectureInfo, native: bool, specs: Iterable[HookRequest]) -> list[ResolvedHook]:
    """Resolve requests to captures; raise HookSpecError (listing what is valid) on any bad one.

    Already-resolved hooks pass through, so a caller that resolved early (the server's
    request thread, a hook registry) never resolves again.
    """
    return [r for _, hooks in resolve_requests(info, native, specs) for r in hooks]


def resolve_requests(
    info: ArchitectureInfo, native: bool, specs: Iterable[HookRequest]
) -> list[tuple[HookRequest, list[ResolvedHook]]]:
    """Each request with the captures it resolved to (one, or two for input and output), in order.

    For a caller that must know which request asked for which hook id (a cache indexed by
    the names the caller used), without resolving anything twice.
    """
    offered = offered_components(info, native)
    out: list[tuple[HookRequest, list[ResolvedHook]]] = []
    seen: set[str] = set()
    for index, raw in enumerate(specs):
        if isinstance(raw, ResolvedHook):
            out.append((raw, [raw]))
            continue
        try:
            spec = ActivationHookSpec.from_any(raw)
            out.append((raw, _resolve_one(spec, info, offered)))
        except HookSpecError as exc:
            field = f".{exc.param}" if exc.param in ("edit", "indices", "positions", "dtype") else ""
            raise HookSpecError(f"activation_hooks[{index}]: {exc}", param=f"activation_hooks[{index}]{field}") from None
    for _, hooks in out:
        for r in hooks:
            if r.hook_id in seen:
                raise HookSpecError(f"Hook id {r.hook_id!r} is requested twice; give each hook a distinct hook_id.")
            seen.add(r.hook_id)
    return out


def _resolve_one(spec: ActivationHookSpec, info: ArchitectureInfo, offered: tuple[ComponentType, ...]) -> list[ResolvedHook]:
    if getattr(info, "saes", ()) and info.wants_sae_features(spec):  # an attached SAE's features (mlx_engine/sae/attach.py)
        return [info.resolve_sae_features(spec)]
    resolved = _resolve_site(spec, info, offered)
    if spec.indices is not None:
        for r in resolved:
            heads, width = position_shape(info, r.component)
            if r.component in (C.ATTENTION_SCORES, C.ATTENTION_PATTERN, C.ROUTER):
                raise HookSpecError(f"'indices' selects features of the last axis; {r.component.value} has none to select.", param="indices")
            if max(spec.indices) >= width:
                raise HookSpecError(
                    f"index {max(spec.indices)} is out of range: {r.hook_id} has {width} features (0..{width - 1}).", param="indices"
                )
    return resolved


def _resolve_site(spec: ActivationHookSpec, info: ArchitectureInfo, offered: tuple[ComponentType, ...]) -> list[ResolvedHook]:
    layer, special, implied, suggested = _parse_layer(spec.layer_name, info, offered)
    component = _component(spec.component, offered) or suggested
    capture_input, capture_output = spec.capture_input, spec.capture_output
    if implied is not None:
        implied_component, implied_input = implied
        if component is not None and component is not implied_component:
            raise HookSpecError(
                f"{spec.layer_name!r} names the {implied_component.value} component but the spec says {component.value!r}."
            )
        component = implied_component
        if implied_input:
            capture_input, capture_output = True, False
    if special == "embedding":
        component = component or C.EMBEDDING
        if component is not C.EMBEDDING:
            raise HookSpecError(f"The embedding offers only the 'embedding' component, not {component.value!r}.")
    if component is None:
        raise HookSpecError(
            f"No component given for {spec.layer_name!r}; valid: {', '.join(c.value for c in offered)}."
        )
    if component not in offered and special != "final_norm":  # every model has a final norm
        raise HookSpecError(
            f"Component {component.value!r} is not offered by this model; valid: {', '.join(c.value for c in offered)}."
        )
    if component is C.EMBEDDING:
        special = "embedding"
    if not (capture_input or capture_output):
        raise HookSpecError("capture_input and capture_output are both false: nothing to capture.")

    if special == "embedding":
        if capture_input:
            raise HookSpecError("The embedding has no input tensor to capture (its input is token ids).")
        return [ResolvedHook(spec.hook_id or "embedding", "embedding", None, "embedding", C.EMBEDDING, False, spec.edit, spec.indices, spec.positions, spec.dtype)]
    if special == "final_norm":
        if component is not C.LAYERNORM:
            raise HookSpecError(f"The final norm offers only the 'layernorm' component, not {component.value!r}.")
        if capture_input:
            raise HookSpecError(
                f"The final norm's input is layer {info.num_layers - 1}'s residual output; capture that instead."
            )
        if not info.final_norm:
            raise HookSpecError(f"This model has no final-norm hook point; layer {info.num_layers - 1}'s residual is its input.")
        return [ResolvedHook(spec.hook_id or "final_norm", "final_norm", None, "final_norm", C.LAYERNORM, False, spec.edit, spec.indices, spec.positions, spec.dtype)]

    if not 0 <= layer < info.num_layers:
        raise HookSpecError(
            f"Layer {layer} is out of range: this model has {info.num_layers} layers (0..{info.num_layers - 1}).",
        )
    out: list[ResolvedHook] = []
    base_id = spec.hook_id or f"layers.{layer}.{component.value}"
    for is_input, wanted in ((False, capture_output), (True, capture_input)):
        if not wanted:
            continue
        site = BLOCK_SITE_OF.get((component, is_input))
        if site is None:
            raise HookSpecError(f"Component {component.value!r} has no input to capture; set capture_input to false.")
        if is_input and not supports_input(component, offered):
            raise HookSpecError(
                f"Component {component.value!r} has no input hook point on this model: it has no pre-attention norm "
                "whose output is the attention input. Capture 'residual' with capture_input for the block input, "
                "or set capture_input to false."
            )
        hook_id = base_id
        if is_input:
            hook_id = f"{base_id}.input" if (capture_output or spec.hook_id is None) else base_id
        out.append(ResolvedHook(hook_id, f"layers.{layer}.{site}", layer, f"layers.{layer}", component, is_input, spec.edit, spec.indices, spec.positions, spec.dtype))
    return out
