"""Interventions bound to one run and applied inside the forward pass (MLX).

Binding reads what depends on the run: the positions it passes through the model
(the prompt's, then one per generated token but the last), and the operands of `mean`
and `patch` taken from captures (`source`, or a stored capture named by `capture_id`).
`apply` edits one pass's tensor. Hook tensors keep the batch axis: [B, T, d] or
[B, H, T, D]; operands become MLX arrays on the first `apply`, on the thread that runs
the model, where MLX arrays belong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Optional

import mlx.core as mx
import numpy as np

from ..hooks.architecture import ArchitectureInfo
from .resolve import InterventionRequest, ResolvedIntervention, mean_operand, patch_operand, resolve_interventions
from .sources import source_pieces
from .spec import intervention_error


class BoundIntervention:
    """A resolved intervention bound to a run's prompt length and sources; `apply` edits a pass."""

    def __init__(self, resolved: ResolvedIntervention, prompt_len: int, operand: Optional[np.ndarray], source_start: int = 0) -> None:
        self.resolved = resolved
        self.spec = resolved.spec
        self.prompt_len = prompt_len
        self._operand = operand
        self._source_start = source_start
        self._source_len = 0 if self.spec.op != "patch" or operand is None else operand.shape[-2]
        self._mx: Optional[dict[str, Optional[mx.array]]] = None

    @property
    def site(self) -> str:
        return self.resolved.site

    @property
    def op(self) -> str:
        return self.spec.op

    def metadata(self) -> dict[str, Any]:
        """The resolved metadata, with what was bound: a patch's source positions, its stored capture."""
        meta = self.resolved.metadata()
        if self.spec.op == "patch":
            meta["source_positions"] = [self._source_start, self._source_start + self._source_len]
        for key in ("capture_id", "capture_hook"):
            if getattr(self.spec, key) is not None:
                meta[key] = getattr(self.spec, key)
        return meta

    def _bind(self) -> dict[str, Optional[mx.array]]:
        if self._mx is not None:
            return self._mx
        r, s = self.resolved, self.spec
        operand = None
        if self._operand is not None:
            operand = mx.array(self._operand)
            if s.op != "patch":  # one position: [d] -> [1, 1, d]; [H, D] -> [1, H, 1, D]; [k, d] -> [1, 1, k, d]
                operand = operand[None, :, None, :] if r.layout == "heads" else operand[None, None]
        mask = None
        if s.indices is not None or s.heads is not None:
            cols = list(s.indices) if s.indices is not None else list(range(r.width))
            if r.layout != "tokens":
                rows = list(s.heads) if s.heads is not None else list(range(r.n_heads))
                keep = np.zeros((r.n_heads, r.width), dtype=bool)
                keep[np.ix_(rows, cols)] = True
                mask = mx.array(keep)[None, :, None, :] if r.layout == "heads" else mx.array(keep)[None, None]
            else:
                keep = np.zeros(r.width, dtype=bool)
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
        op, s, layout = self.spec.op, self.spec, self.resolved.layout
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
        elif op == "topk":
            new = _keep_top_k(x, s.k)
        else:  # patch: the source row at each position of the pass
            take = mx.array(np.clip(np.arange(start, end) - self._source_start, 0, self._source_len - 1))
            src = bound["operand"]
            new = (src[:, take] if layout == "heads" else src[take])[None]
        mask = bound["features"]
        if rows is not None:
            row_mask = mx.array(rows)
            if layout == "heads":
                row_mask = row_mask[None, None, :, None]
            elif layout == "experts":
                row_mask = row_mask[None, :, None, None]
            else:
                row_mask = row_mask[None, :, None]
            mask = row_mask if mask is None else mx.logical_and(mask, row_mask)
        if mask is not None:
            new = mx.where(mask, new, x)
        return new.astype(x.dtype)

    def __repr__(self) -> str:
        return f"BoundIntervention({self.metadata()!r})"


def _keep_top_k(x: mx.array, k: int) -> mx.array:
    """x with all but its k largest-magnitude features per position (last axis) set to 0.

    Exactly k survive: the k indices of argpartition, so ties at the threshold do not keep more.
    """
    if k >= x.shape[-1]:
        return x
    magnitude = mx.abs(x.astype(mx.float32))
    keep = mx.argpartition(-magnitude, kth=k - 1, axis=-1)[..., :k]
    mask = mx.put_along_axis(mx.zeros(x.shape, dtype=mx.bool_), keep, mx.array(True), axis=-1)
    return mx.where(mask, x, mx.zeros_like(x))


def _check_patch_coverage(r: ResolvedIntervention, length: int, start: int, prompt_len: int, n_positions: int, field: str) -> None:
    end = start + length
    where = r.spec.positions
    if isinstance(where, tuple):
        outside = [p for p in where if not start <= p < end]
        if outside:
            raise intervention_error(r.index, "positions", f"the patch source covers positions {start}..{end - 1}; position {outside[0]} is outside it.")
        return
    lo, hi = {"all": (0, n_positions), "prompt": (0, prompt_len), "generated": (prompt_len, n_positions)}[where]
    if max(lo, start) >= min(hi, end):
        raise intervention_error(
            r.index, field,
            f"the patch source covers positions {start}..{end - 1}, none of the positions {where!r} ({lo}..{hi - 1}) of this run.",
        )


def bind_one(r: ResolvedIntervention, prompt_len: int, n_positions: int, sources: Optional[Mapping[str, Any]]) -> BoundIntervention:
    """Check what depends on the run and read any capture the operand comes from."""
    spec = r.spec
    if isinstance(spec.positions, tuple) and spec.positions[-1] >= n_positions:
        raise intervention_error(
            r.index, "positions",
            f"position {spec.positions[-1]} is out of range: this run passes positions 0..{n_positions - 1} "
            f"through the model (a {prompt_len}-token prompt, then one position per generated token but the last).",
        )
    operand, source_start, field = r.operand, 0, "values"
    if r.needs_source:
        if spec.source is not None:
            field = "source"
            hook = spec.capture_hook or spec.capture_id
            pieces = source_pieces(spec.source, hook, r.hook.hook_id, r.index, field)
        else:
            field = "capture_id"
            stored = sources or {}
            if spec.capture_id not in stored:
                known = ", ".join(sorted(stored)) or "none"
                raise intervention_error(r.index, "capture_id", f"no stored capture {spec.capture_id!r}; stored: {known}.")
            pieces = source_pieces(stored[spec.capture_id], spec.capture_hook, r.hook.hook_id, r.index, field)
        if spec.op == "mean":
            operand = mean_operand(pieces, r.n_heads, r.width, r.index, field, r.hook.hook_id)
        else:
            operand, source_start = patch_operand(pieces, r.n_heads, r.width, r.index, field, r.hook.hook_id)
    if spec.op == "patch":
        assert operand is not None
        _check_patch_coverage(r, operand.shape[1 if r.n_heads else 0], source_start, prompt_len, n_positions, field)
    return BoundIntervention(r, prompt_len, operand, source_start)


def bind_interventions(
    resolved: Iterable[Any], *, prompt_len: int, max_tokens: int = 0, sources: Optional[Mapping[str, Any]] = None
) -> list[BoundIntervention]:
    """Bind resolved interventions to a run: `prompt_len` and `max_tokens` fix which positions pass
    through the model (max_tokens=0 for a single forward such as run_with_cache); `sources`
    maps a `capture_id` to a stored capture. Bound ones pass through if bound for the same prompt."""
    n_positions = prompt_len + max(max_tokens - 1, 0)
    out: list[BoundIntervention] = []
    for index, r in enumerate(resolved):
        if isinstance(r, BoundIntervention):
            if r.prompt_len != prompt_len:
                raise intervention_error(index, None, f"this intervention was resolved for a {r.prompt_len}-token prompt, not {prompt_len}.")
            out.append(r)
            continue
        out.append(bind_one(r, prompt_len, n_positions, sources))
    return out


def prepare_interventions(
    kit_or_info: Any,
    specs: Optional[Iterable[InterventionRequest]],
    *,
    prompt_len: int,
    max_tokens: int = 0,
    sources: Optional[Mapping[str, Any]] = None,
    native: Optional[bool] = None,
) -> list[BoundIntervention]:
    """Resolve and bind in one call (the Python API's path): a ModelKit, or an ArchitectureInfo with `native`."""
    if isinstance(kit_or_info, ArchitectureInfo):
        info, is_native = kit_or_info, bool(native)
    else:
        info, is_native = kit_or_info.arch_info, kit_or_info.native
    resolved = resolve_interventions(info, is_native, specs)
    return bind_interventions(resolved, prompt_len=prompt_len, max_tokens=max_tokens, sources=sources)
