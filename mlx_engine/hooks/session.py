"""A hook session: the sites one run captures or edits, armed for that run only.

The generation loop brackets each forward pass with `begin_pass`/`end_pass`; the
captures of a pass are lazy arrays that the loop evaluates together with that pass's
logits. A site that an intervention edits runs a chain: captures labelled "before",
the edits in request order, then the other captures (labelled "after"); a site with
captures only keeps the plain recorder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import mlx.core as mx

from .capture import Capture
from .components import EXPERT_COMPONENTS, HEAD_COMPONENTS, KEYED_COMPONENTS, ComponentType
from .names import ResolvedHook
from .point import HookFn, HookPoint

if TYPE_CHECKING:
    from ..interventions.ops import BoundIntervention


# Components whose rows (positions) are axis 1 of the capture ([H, T, ...]); the rest have them on axis 0.
ROWS_ON_AXIS_1 = HEAD_COMPONENTS + KEYED_COMPONENTS


def _rows_wanted(r: ResolvedHook, state: "_PassState") -> Optional[list[int]]:
    """The absolute positions of this pass the hook keeps: None for all of them."""
    if r.positions is None:
        return None
    if r.positions == "last":
        return [state.end - 1]
    return [p for p in r.positions if state.start <= p < state.end]


class HookBusyError(RuntimeError):
    """The model's hook points are armed by another session."""


@dataclass
class _PassState:
    step: int
    start: int
    end: int


class HookSession:
    """Arms the sites a run needs, records captures pass by pass, and applies its edits."""

    def __init__(
        self,
        points: dict[str, HookPoint],
        resolved: Sequence[ResolvedHook] = (),
        interventions: Sequence["BoundIntervention"] = (),
    ) -> None:
        self.resolved = list(resolved)
        # Keyed by HookPoint identity: one point may serve two sites (a fallback model's
        # block-0 input is both `embedding` and `layers.0.resid_pre`).
        self._armed: dict[int, HookPoint] = {}
        self._by_point: dict[int, list[ResolvedHook]] = {}
        for r in self.resolved:
            point = points[r.site]
            self._armed[id(point)] = point
            self._by_point.setdefault(id(point), []).append(r)
        self._edits: dict[int, list["BoundIntervention"]] = {}
        for edit in interventions:
            point = points[edit.site]
            shard = getattr(point, "shard", None)
            if shard is not None:  # a tensor-parallel site: this rank edits the slice it holds (mlx_engine/distributed)
                edit = shard.localize(edit)
            self._armed[id(point)] = point
            self._edits.setdefault(id(point), []).append(edit)
        # An SAE's feature point (mlx_engine/sae/attach.py) is called by the SAE that runs at its site:
        # arming it arms that site too, where the SAE runs after the site's own edits (`splice`).
        self._stages: dict[int, list[HookPoint]] = {}
        for point in list(self._armed.values()):
            site = getattr(point, "site_point", None)
            if site is not None:
                self._armed[id(site)] = site
                self._stages.setdefault(id(site), []).append(point)
        stages_edited = {k for k, fps in self._stages.items() if any(id(p) in self._edits for p in fps)}
        self._edited = set(self._edits) | stages_edited
        self._before: dict[int, list[ResolvedHook]] = {}
        self._after: dict[int, list[ResolvedHook]] = {}
        for key in self._edited:
            for r in self._by_point.get(key, []):
                side = self._before if r.edit == "before" else self._after
                side.setdefault(key, []).append(r)
        self._pass: Optional[_PassState] = None
        self._buffer: list[Capture] = []

    def _record(self, hp: HookPoint, x: mx.array, context: dict[str, Any]) -> mx.array:
        state = self._pass
        if state is None:  # a forward outside a bracketed pass (e.g. a warm-up): not ours to keep
            return x
        self._collect(hp, self._by_point.get(id(hp), ()), x, context, state, None)
        for stage in self._stages.get(id(hp), ()):  # an SAE that only captures: x comes back unchanged
            x = stage.splice(x)
        return x

    def _edit(self, hp: HookPoint, x: mx.array, context: dict[str, Any]) -> mx.array:
        state = self._pass
        if state is None:
            return x
        key = id(hp)
        self._collect(hp, self._before.get(key, ()), x, context, state, "before")
        for edit in self._edits.get(key, ()):
            x = edit.apply(x, state.start, state.end)
        for stage in self._stages.get(key, ()):
            x = stage.splice(x)
        self._collect(hp, self._after.get(key, ()), x, context, state, "after")
        return x

    def _collect(
        self,
        hp: HookPoint,
        hooks: Iterable[ResolvedHook],
        x: mx.array,
        context: dict[str, Any],
        state: _PassState,
        edit: Optional[str],
    ) -> None:
        hooks = list(hooks)
        shard = getattr(hp, "shard", None)
        if hooks and shard is not None:
            # A tensor-parallel site holds this rank's heads or units: capture the whole tensor,
            # gathered from every rank in the unsharded order (mlx_engine/distributed/sites.py).
            x = shard.gather(x)
        for r in hooks:
            rows = _rows_wanted(r, state)
            if rows is not None and not rows:
                continue  # none of the requested positions is in this pass
            extras: dict[str, mx.array] = {}
            if r.component is ComponentType.ROUTER:
                extras = {"experts": context["experts"][0], "weights": context["weights"][0]}
            elif r.component in EXPERT_COMPONENTS:
                extras = {"experts": context["experts"][0]}
            array = x[0]
            select = context.get("select")
            if select is not None:  # a point that hands out a summary of its tensor (an SAE's top-k features)
                array, extras = select(array)
            positions = (state.start, state.end)
            if rows is not None:
                # A subset of the positions: only those rows are kept (and evaluated).
                axis = 1 if r.component in ROWS_ON_AXIS_1 else 0
                take = mx.array([p - state.start for p in rows])
                array = mx.take(array, take, axis=axis)
                extras = {k: mx.take(v, take, axis=0) for k, v in extras.items()}
                positions = (rows[0], rows[-1] + 1)
            if r.indices is not None:
                # A subset of the features: only those columns are kept (and evaluated).
                array = mx.take(array, mx.array(r.indices), axis=-1)
            if r.dtype is not None:
                array = array.astype(getattr(mx, r.dtype))
            self._buffer.append(
                Capture(
                    hook_id=r.hook_id,
                    layer_name=r.layer_name,
                    layer=r.layer,
                    component=r.component.value,
                    step=state.step,
                    positions=positions,
                    is_input=r.is_input,
                    array=array,
                    key_positions=context.get("key_positions"),
                    extras=extras,
                    edit=edit,
                    indices=list(r.indices) if r.indices is not None else None,
                    row_positions=rows,
                )
            )

    def handlers(self) -> list[tuple[HookPoint, HookFn]]:
        """Each point this session arms, with the function it would set there.

        A batch of runs (generation/batch.py) arms one dispatcher per point instead, which
        hands each row's slice [1, ...] of the tensor to that row's session's function.
        """
        return [(point, self._edit if key in self._edited else self._record) for key, point in self._armed.items()]

    @property
    def edits(self) -> bool:
        return bool(self._edited)

    def arm(self) -> None:
        for point in self._armed.values():
            if point.fn is not None:
                raise HookBusyError(
                    f"Hook point {point.name} is already armed by another session on this model; "
                    "finish or close that generator first."
                )
        for point, fn in self.handlers():
            point.fn = fn

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
