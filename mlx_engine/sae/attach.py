"""An SAE attached to a model: its features become a hook point (`sae_features`), captured and edited
like any other, with the model files unchanged.

`attach_sae(kit, sae)` resolves the SAE's hook (`blocks.5.hook_resid_post` -> `layers.5.residual`),
adds a `FeaturePoint` named `{hook id}.sae_features` to `kit.hook_points`, and gives the kit an
`SAEInfo` (its ArchitectureInfo plus the attached sites), through which hooks/names.py resolves
`sae_features` requests. A hook session that arms a feature point arms the SAE's site too
(hooks/session.py); there the SAE runs after the site's own edits:

    f = encode(x);  f' = feature point(f)   (captures; feature interventions edit f)
    x' = x                         if f' is f (nothing edited: the model's numbers are untouched)
    x' = x + delta(f' - f)         otherwise, = decode(f') + (x - decode(f)): the error is kept

so an attached, unedited SAE leaves the output exactly as it was, and an edit changes the site by
exactly its decoder delta. Requests: `{"layer_name": 5, "component": "sae_features"}` (the one SAE
of layer 5), `layers.5.residual.sae_features`, SAELens's `blocks.5.hook_resid_post.hook_sae_acts_post`,
or the base name with `component: "sae_features"`. With `top_k`, captures carry the k largest
features of each position as ids [T, k] (uint32) with their `values` as an extra, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Iterable, Optional, Union

import mlx.core as mx

from ..hooks.architecture import ArchitectureInfo
from ..hooks.components import EXPERT_COMPONENTS, HEAD_COMPONENTS, KEYED_COMPONENTS, ComponentType, position_shape
from ..hooks.names import ActivationHookSpec, HookSpecError, ResolvedHook, resolve_hooks
from ..hooks.point import HookPoint
from ..loading import ModelKit
from .formats import SAESource, load_sae
from .model import SAE, SAEError

C = ComponentType
FEATURES = "sae_features"
SUFFIXES = (f".{FEATURES}", ".hook_sae_acts_post")


@dataclass(frozen=True)
class SAESite:
    """One attached SAE, as hook resolution sees it (plain data: request threads may read it)."""

    hook_id: str  # the feature hook's id and its HookPoint's name: "layers.5.residual.sae_features"
    base: ResolvedHook  # the site the SAE reads and edits
    d_sae: int
    top_k: Optional[int]
    hook_name: Optional[str]  # the SAE's own name for its hook (cfg.json)


@dataclass(frozen=True)
class SAEInfo(ArchitectureInfo):
    """A model's ArchitectureInfo with the SAEs attached to it; resolves their `sae_features` hooks."""

    saes: tuple[SAESite, ...] = ()
    native: bool = True

    @classmethod
    def of(cls, info: ArchitectureInfo, native: bool, saes: tuple[SAESite, ...]) -> ArchitectureInfo:
        base = {f.name: getattr(info, f.name) for f in fields(ArchitectureInfo)}
        return cls(**base, saes=saes, native=native) if saes else ArchitectureInfo(**base)

    def wants_sae_features(self, spec: ActivationHookSpec) -> bool:
        component = spec.component.value if isinstance(spec.component, Enum) else spec.component
        name = spec.layer_name.strip() if isinstance(spec.layer_name, str) else ""
        return component == FEATURES or name.endswith(SUFFIXES)

    def _listing(self) -> str:
        return ", ".join(s.hook_id for s in self.saes)

    def find(self, name: Union[str, int]) -> SAESite:
        """The attached SAE a (base) name means: its site's name, or a layer with one SAE."""
        try:
            (base,) = resolve_hooks(self, self.native, [name])
        except (HookSpecError, ValueError) as exc:
            try:
                (probe,) = resolve_hooks(self, self.native, [{"layer_name": name, "component": "residual"}])
            except (HookSpecError, ValueError):
                message = str(exc).removeprefix("activation_hooks[0]: ").rstrip(".")
                raise HookSpecError(f"{message}; attached SAEs: {self._listing()}.") from None
            at_layer = [s for s in self.saes if s.base.layer == probe.layer]
            if len(at_layer) != 1:
                what = "no SAE is" if not at_layer else f"{len(at_layer)} SAEs are"
                raise HookSpecError(f"{what} attached at layer {probe.layer}; name one of the attached SAEs: {self._listing()}.") from None
            return at_layer[0]
        for s in self.saes:
            if s.base.site == base.site:
                return s
        raise HookSpecError(f"no SAE is attached at {base.hook_id}; attached SAEs: {self._listing()} (attach one with mlx_engine.attach_sae).")

    def resolve_sae_features(self, spec: ActivationHookSpec) -> ResolvedHook:
        """The capture (or edit site) of an attached SAE's features (called by hooks/names.py)."""
        name = spec.layer_name
        if isinstance(name, str):
            for suffix in SUFFIXES:
                name = name.strip().removesuffix(suffix)
        site = self.find(name)
        if spec.capture_input:
            raise HookSpecError(f"{site.hook_id} is the SAE's output (its features); it has no input to capture.")
        if spec.indices is not None and max(spec.indices) >= site.d_sae:
            raise HookSpecError(f"index {max(spec.indices)} is out of range: {site.hook_id} has {site.d_sae} features.", param="indices")
        if site.top_k and (spec.indices is not None or spec.dtype is not None):
            raise HookSpecError(
                f"{site.hook_id} captures its top {site.top_k} features per position (ids with values); 'indices' and 'dtype' "
                "apply to dense captures (attach the SAE without top_k).", param="indices" if spec.indices else "dtype",
            )
        b = site.base
        return ResolvedHook(spec.hook_id or site.hook_id, site.hook_id, b.layer, b.layer_name, C.SAE_FEATURES, False,
                            spec.edit, spec.indices, spec.positions, spec.dtype)


class FeaturePoint(HookPoint):
    """The features of an SAE attached at `site_point`; the session calls `splice` at that site."""

    __slots__ = ("site_point", "sae", "top_k", "heads")

    def __init__(self, name: str, site_point: HookPoint, sae: SAE, top_k: Optional[int], heads: bool) -> None:
        super().__init__(name)
        self.site_point = site_point
        self.sae = sae
        self.top_k = top_k
        self.heads = heads  # the site is [B, H, T, D] (z, query, ...): the SAE reads [B, T, H * D]

    def splice(self, x: mx.array) -> mx.array:
        """The site's tensor after the SAE: x itself unless a feature was edited, else x + the decoder delta."""
        rows = x
        if self.heads:
            b, h, t, d = x.shape
            rows = x.transpose(0, 2, 1, 3).reshape(b, t, h * d)
        f, state = self.sae.encode_with_state(rows)
        edited = self(f, select=self._select) if self.top_k else self(f)
        if edited is f:
            return x
        delta = self.sae.delta(edited - f, state)
        if self.heads:
            delta = delta.reshape(b, t, h, d).transpose(0, 2, 1, 3)
        return x + delta.astype(x.dtype)

    def _select(self, f: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
        """The k largest features of each position: ids [T, k] and their values, largest first."""
        k = min(int(self.top_k or 1), f.shape[-1])
        ids = mx.argpartition(-f, kth=k - 1, axis=-1)[..., :k]
        values = mx.take_along_axis(f, ids, axis=-1)
        order = mx.argsort(-values, axis=-1)
        return mx.take_along_axis(ids, order, axis=-1), {"values": mx.take_along_axis(values, order, axis=-1)}


@dataclass
class AttachedSAE:
    """An SAE attached to a kit: its feature hook id, and feature edits written as interventions."""

    kit: ModelKit
    sae: SAE
    hook_id: str
    base: ResolvedHook

    def hook(self, **fields_: Any) -> dict[str, Any]:
        """A hook spec capturing the features (`positions`, `indices`, `edit`, ... as any hook spec)."""
        return {"layer_name": self.hook_id, **fields_}

    def _edit(self, op: str, features: Union[int, Iterable[int], None], **fields_: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"layer_name": self.hook_id, "op": op, **fields_}
        if features is not None:
            spec["indices"] = [features] if isinstance(features, int) else list(features)
        return spec

    def clamp(self, features: Union[int, Iterable[int]], value: float, **where: Any) -> dict[str, Any]:
        """Set the features to `value` (clamped from both sides)."""
        return self._edit("clamp", features, min=value, max=value, **where)

    def scale(self, features: Union[int, Iterable[int]], factor: float, **where: Any) -> dict[str, Any]:
        return self._edit("scale", features, scale=factor, **where)

    def ablate(self, features: Union[int, Iterable[int]], **where: Any) -> dict[str, Any]:
        """Zero the features: their decoder directions leave the site."""
        return self._edit("zero", features, **where)

    def add(self, feature: int, amount: float, **where: Any) -> dict[str, Any]:
        """Add `amount` to the feature: `amount` times its decoder direction joins the site."""
        if not 0 <= feature < self.sae.d_sae:
            raise SAEError(f"feature {feature} is out of range: the SAE has {self.sae.d_sae} features.")
        vector = [0.0] * self.sae.d_sae
        vector[feature] = 1.0
        return self._edit("add", None, vector=vector, scale=amount, **where)

    def interventions(self, specs: Iterable[Any]) -> list[Any]:
        """Feature interventions resolved against this SAE alone (any mix of attached widths)."""
        from ..interventions.resolve import resolve_interventions

        info = self.kit.arch_info
        mine = tuple(s for s in getattr(info, "saes", ()) if s.hook_id == self.hook_id)
        if not mine:
            raise SAEError(f"{self.hook_id} is no longer attached to this model.")
        return resolve_interventions(SAEInfo.of(info, self.kit.native, mine), self.kit.native, specs)

    def detach(self) -> None:
        detach_sae(self.kit, self.hook_id)


def _site_width(info: ArchitectureInfo, base: ResolvedHook) -> tuple[bool, int]:
    """(heads layout, width per position as the SAE reads it) of a site, or a clear refusal."""
    if base.component in KEYED_COMPONENTS or base.component in (C.ROUTER, C.SAE_FEATURES) or base.component in EXPERT_COMPONENTS:
        raise SAEError(f"an SAE cannot be attached at {base.hook_id}: {base.component.value} is not an activation vector per token.")
    heads, width = position_shape(info, base.component)
    if base.component in HEAD_COMPONENTS:
        return True, heads * width
    return False, width


def attach_sae(kit: ModelKit, sae: Union[SAE, SAESource], *, hook: Optional[str] = None, top_k: Optional[int] = None) -> AttachedSAE:
    """Attach `sae` (an SAE, a folder or a Hub id) at its hook (or `hook`); its features become a hook point.

    Raises SAEError for a width mismatch (d_in against the site), a transcoder, a second SAE at one
    site; HookSpecError for a hook name this model does not have.
    """
    if not isinstance(sae, SAE):
        sae = load_sae(sae)
    if sae.cfg.transcoder:
        raise SAEError("a transcoder reads one hook and writes another; attaching transcoders as hook points is not supported.")
    name = hook or sae.cfg.hook_name
    if not name:
        raise SAEError("the SAE names no hook (cfg metadata.hook_name); pass hook=, e.g. 'blocks.5.hook_resid_post'.")
    resolved = resolve_hooks(kit.arch_info, kit.native, [name])
    if len(resolved) != 1:
        raise SAEError(f"hook {name!r} names {len(resolved)} sites; give one.")
    base = resolved[0]
    heads, width = _site_width(kit.arch_info, base)
    if sae.d_in != width:
        raise SAEError(f"d_in mismatch: the SAE reads {sae.d_in} features per token but {base.hook_id} ({name}) has {width}.")
    if heads and sae.cfg.reshape_activations != "hook_z":
        raise SAEError(f"{base.hook_id} is per head; an SAE there must read the heads flattened (reshape_activations 'hook_z').")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= sae.d_sae):
        raise SAEError(f"top_k must be an integer in 1..{sae.d_sae}, got {top_k!r}.")
    hook_id = f"{base.hook_id}.{FEATURES}"
    if hook_id in kit.hook_points:
        raise SAEError(f"an SAE is already attached at {base.hook_id}; detach it first (mlx_engine.sae.detach_sae).")
    kit.hook_points[hook_id] = FeaturePoint(hook_id, kit.hook_points[base.site], sae, top_k, heads)
    site = SAESite(hook_id, base, sae.d_sae, top_k, sae.cfg.hook_name)
    kit.arch_info = SAEInfo.of(kit.arch_info, kit.native, (*getattr(kit.arch_info, "saes", ()), site))
    return AttachedSAE(kit, sae, hook_id, base)


def detach_sae(kit: ModelKit, which: Union[AttachedSAE, str]) -> None:
    """Remove an attached SAE (by handle or feature hook id); the kit is as before it was attached."""
    hook_id = which.hook_id if isinstance(which, AttachedSAE) else which
    saes = tuple(getattr(kit.arch_info, "saes", ()))
    if hook_id not in [s.hook_id for s in saes]:
        raise SAEError(f"no SAE is attached as {hook_id!r}; attached: {', '.join(s.hook_id for s in saes) or 'none'}.")
    point = kit.hook_points[hook_id]
    if point.fn is not None:
        raise SAEError(f"{hook_id} is in use by a running generation; close it first.")
    del kit.hook_points[hook_id]
    kit.arch_info = SAEInfo.of(kit.arch_info, kit.native, tuple(s for s in saes if s.hook_id != hook_id))


def attached_saes(kit: ModelKit) -> list[dict[str, Any]]:
    """The SAEs attached to a kit, as a JSON-ready listing (the one hook_points() shows)."""
    from ..hooks.listing import describe_saes

    return describe_saes(kit.arch_info)
