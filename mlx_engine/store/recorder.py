"""Batched capture for extraction: arm the hook points, run B windows in one pass, keep the real rows.

The generation HookSession drops the batch axis (its runs are batch 1); extraction runs
B windows at once, right-padded to the longest. Every native model's mask is causal, so
a real token attends only to the positions before it in its own row: the padding after
it never reaches it: a real row's bits do not depend on the pad tokens. Against a window
run alone, the padded batch differs only in float32 rounding, where BLAS blocks a
[B*T, d] matmul differently from a [T, d] one (tests/test_store_extract.py proves both,
against run_with_cache, within 1e-5). The padded rows are dropped before evaluation, so
they are never copied out of MLX.

Only components with one vector per position are storable: [B, T, width] sites as they
are, per-head sites ([B, H, T, D]: query, key, value, z) flattened to width H*D (column
h*D + d). Scores and patterns have a key axis whose length changes with the position,
and the routed experts' rows name a different expert per token, so both are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..hooks.architecture import ArchitectureInfo
from ..hooks.components import (
    EXPERT_COMPONENTS,
    HEAD_COMPONENTS,
    KEYED_COMPONENTS,
    ComponentType,
    position_shape,
)
from ..hooks.names import ResolvedHook
from ..hooks.point import HookPoint
from ..hooks.session import HookBusyError
from .errors import StoreError

STORE_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Tensor names every shard holds beside the hooks.
INDEX_TENSORS = ("tokens", "doc", "pos")


@dataclass(frozen=True)
class StoredHook:
    """A resolved hook as the store keeps it: its row width and what a column means."""

    hook: ResolvedHook
    width: int
    columns: str

    @property
    def hook_id(self) -> str:
        return self.hook.hook_id

    def to_json(self, dtype: str) -> dict[str, Any]:
        r = self.hook
        return {
            "hook_id": r.hook_id, "site": r.site, "layer": r.layer, "layer_name": r.layer_name,
            "component": r.component.value, "is_input": r.is_input,
            "indices": list(r.indices) if r.indices is not None else None,
            "width": self.width, "dtype": dtype, "columns": self.columns,
        }


def storable(info: ArchitectureInfo, hooks: Sequence[ResolvedHook]) -> list[StoredHook]:
    """Each hook's row width and column meaning; a StoreError for a hook that has no rows to store."""
    out = []
    for r in hooks:
        if r.component in KEYED_COMPONENTS:
            raise StoreError(
                f"{r.hook_id} ({r.component.value}) is [heads, T, S] with S keys that grow with the position, so it has "
                "no fixed-width row to store; capture it per prompt with run_with_cache, or store query and key."
            )
        if r.component in EXPERT_COMPONENTS:
            raise StoreError(
                f"{r.hook_id} ({r.component.value}) holds the k experts each token was routed to, so a column would mean "
                "a different expert on each row; store the router or the mlp output instead."
            )
        if r.hook_id in INDEX_TENSORS:
            raise StoreError(f"Hook id {r.hook_id!r} is reserved for the store's own {r.hook_id} tensor; give another hook_id.")
        chosen = len(r.indices) if r.indices is not None else None
        if r.component in HEAD_COMPONENTS:
            heads, head_dim = position_shape(info, r.component)
            per_head = chosen or head_dim
            width, columns = heads * per_head, f"head * {per_head} + dim: {heads} heads of {per_head}"
        elif r.component is ComponentType.ROUTER:
            width, columns = info.n_experts or 0, "expert (router logit)"
        else:
            width = chosen or position_shape(info, r.component)[1]
            columns = "feature"
        if r.indices is not None:
            columns += " (of the listed indices, in their order)"
        out.append(StoredHook(r, width, columns))
    return out


class BatchRecorder:
    """Arms its hooks' points for one extraction and hands back each batch's real rows as numpy."""

    def __init__(self, points: dict[str, HookPoint], hooks: Sequence[StoredHook], dtype: str, pad_token: int = 0) -> None:
        self.hooks = list(hooks)
        self.dtype = STORE_DTYPES[dtype]
        self.pad_token = pad_token
        self._points: dict[int, HookPoint] = {}
        self._by_point: dict[int, list[StoredHook]] = {}
        for h in self.hooks:
            point = points[h.hook.site]
            self._points[id(point)] = point
            self._by_point.setdefault(id(point), []).append(h)
        self._taken: dict[str, mx.array] = {}
        self._rows: Optional[mx.array] = None

    def arm(self) -> None:
        for point in self._points.values():
            if point.fn is not None:
                raise HookBusyError(f"Hook point {point.name} is already armed by another session on this model.")
        for point in self._points.values():
            point.fn = self._record

    def disarm(self) -> None:
        for point in self._points.values():
            if point.fn == self._record:
                point.fn = None

    def _record(self, hp: HookPoint, x: mx.array, context: dict[str, Any]) -> mx.array:
        shard = getattr(hp, "shard", None)
        # A tensor-parallel site holds this rank's heads or units: store the whole tensor, gathered
        # from every rank in the unsharded order (mlx_engine/distributed/sites.py); x goes on as it was.
        whole = shard.gather(x) if shard is not None else x
        for h in self._by_point[id(hp)]:
            array = whole
            if h.hook.indices is not None:
                array = mx.take(array, mx.array(h.hook.indices), axis=-1)
            if h.hook.component in HEAD_COMPONENTS:  # [B, H, T, D] -> [B, T, H*D]
                array = array.transpose(0, 2, 1, 3)
            batch, length = array.shape[0], array.shape[1]
            flat = array.reshape(batch * length, -1)
            if self._rows is not None:
                flat = mx.take(flat, self._rows, axis=0)
            self._taken[h.hook_id] = flat.astype(self.dtype)
        return x

    def run(self, model: Any, windows: Sequence[np.ndarray], pad_to: Optional[int] = None, keep: bool = True) -> dict[str, np.ndarray]:
        """One forward over the windows right-padded to `pad_to` (default: the longest);
        hook id -> [real rows, width] in window order.

        Logits are never evaluated (MLX is lazy), so no LM head runs, and layers past
        the last hook are not computed either. bfloat16 rows come back as their uint16 bits.
        `keep=False` (a rank of a model-parallel job other than 0, store/model_parallel.py):
        the same forward and the same evaluation, so this rank takes part in every
        collective rank 0 runs, and nothing comes back (a pipeline rank sees only the
        sites of its own blocks).
        """
        lengths = [len(w) for w in windows]
        longest = max(max(lengths), pad_to or 0)
        tokens = np.full((len(windows), longest), self.pad_token, dtype=np.uint32)
        for i, w in enumerate(windows):
            tokens[i, : len(w)] = w
        real = np.concatenate([np.arange(n) + i * longest for i, n in enumerate(lengths)])
        self._rows = mx.array(real.astype(np.uint32))
        self._taken = {}
        try:
            model(mx.array(tokens), cache=make_prompt_cache(model))
            taken = self._taken
            mx.eval(*taken.values())
        finally:
            self._taken, self._rows = {}, None
        if not keep:
            return {}
        out = {}
        for hook_id, array in taken.items():
            if array.dtype == mx.bfloat16:
                array = array.view(mx.uint16)
            out[hook_id] = np.array(array, copy=True)
        missing = [h.hook_id for h in self.hooks if h.hook_id not in out]
        if missing:
            raise StoreError(f"The model's forward never reached hook(s) {missing}; this model cannot store them.")
        return out
