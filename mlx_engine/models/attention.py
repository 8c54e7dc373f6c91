"""The attention every native architecture shares: fused when nothing reads its insides,
explicit (scores, mask, softmax with sinks, weighted sum) when a capture asks for them.

Both paths must agree; the explicit one is written out so each step can be captured.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, RotatingKVCache

from . import cpu_parallel
from .base import BlockHooks


def key_positions(cache: Any, n_keys: int, n_new: int) -> mx.array:
    """Absolute token positions of the key columns a cache just returned.

    KVCache returns keys in order from position 0. RotatingKVCache returns them in
    order after a multi-token update, and as a ring buffer after a one-token update:
    the slot just written (`_idx - 1`) holds the newest position.
    """
    if cache is None:
        return mx.arange(n_keys)
    end = cache.offset
    if isinstance(cache, RotatingKVCache) and n_new == 1 and end > n_keys:
        slots = mx.arange(n_keys)
        newest_slot = cache._idx - 1
        return (end - 1) - ((newest_slot - slots) % n_keys)
    return mx.arange(end - n_keys, end)


def _is_ring_order(cache: Any, n_keys: int, n_new: int) -> bool:
    return (
        isinstance(cache, RotatingKVCache)
        and n_new == 1
        and cache.offset > n_keys
        and cache._idx != n_keys
    )


def attend(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    hooks: BlockHooks,
    cache: Any,
    scale: float,
    mask: Union[None, str, mx.array],
    window: Optional[int] = None,
    sinks: Optional[mx.array] = None,
    softcap: Optional[float] = None,
) -> mx.array:
    """Attention over new queries/keys/values [B, H, T, D] (RoPE already applied).

    Calls the query/key/value/score/pattern/z hook points, updates the cache, and
    computes attention fused (`mx.fast.scaled_dot_product_attention`, its rows spread over
    the cores on the CPU backend: cpu_parallel.py) unless scores or the pattern are armed, when it computes them explicitly so they can be captured.
    Logit soft-capping (Gemma 2: `softcap * tanh(scores / softcap)`) has no fused kernel,
    so it always takes the explicit path. Returns [B, n_heads, T, D] before the output projection.
    """
    queries = hooks.query(queries)
    keys = hooks.key(keys)
    values = hooks.value(values)
    n_new = queries.shape[2]
    offset = cache.offset if cache is not None else 0
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)

    if hooks.wants_explicit_attention or softcap is not None:
        out = _explicit_attention(queries, keys, values, hooks, cache, offset, n_new, scale, window, sinks, softcap)
    else:
        out = cpu_parallel.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    return hooks.z(out)


def _explicit_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    hooks: BlockHooks,
    cache: Any,
    offset: int,
    n_new: int,
    scale: float,
    window: Optional[int],
    sinks: Optional[mx.array],
    softcap: Optional[float] = None,
) -> mx.array:
    """Scores, mask, softmax (with sinks) and weighted sum, written out so each can be captured."""
    B, n_heads, T, D = queries.shape
    n_kv, S = keys.shape[1], keys.shape[2]
    if isinstance(cache, BatchKVCache):
        allowed, context = _batch_allowed(cache, offset, T, S, window)
    elif isinstance(cache, BatchRotatingKVCache):
        allowed, context = _batch_window_allowed(cache, offset, T, S, window)
    else:
        positions = key_positions(cache, S, n_new)
        if _is_ring_order(cache, S, n_new):
            # Present key columns in temporal order; attention is order-free over keys.
            order = mx.argsort(positions)
            positions = positions[order]
            keys = keys[:, :, order]
            values = values[:, :, order]
        query_pos = mx.arange(offset, offset + T)[:, None]
        allowed = positions[None, :] <= query_pos
        if window is not None:
            allowed = allowed & (positions[None, :] > query_pos - window)
        context = {"key_positions": positions}

    groups = n_heads // n_kv
    q = queries.astype(mx.float32).reshape(B, n_kv, groups, T, D)
    k = keys.astype(mx.float32)[:, :, None]
    scores = (q * scale) @ k.swapaxes(-1, -2)  # [B, n_kv, groups, T, S]
    scores = scores.reshape(B, n_heads, T, S)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap

    scores = mx.where(allowed, scores, -mx.inf)
    scores = hooks.attention_scores(scores, **context)

    if sinks is not None:
        sink_logits = mx.broadcast_to(sinks.astype(mx.float32)[None, :, None, None], (B, n_heads, T, 1))
        with_sinks = mx.concatenate([scores, sink_logits], axis=-1)
        probs = cpu_parallel.rowwise(lambda rows: mx.softmax(rows, axis=-1, precise=True), with_sinks)[..., :-1]
    else:
        probs = cpu_parallel.rowwise(lambda rows: mx.softmax(rows, axis=-1, precise=True), scores)
    probs = hooks.attention_pattern(probs, **context)

    v = values.astype(mx.float32)[:, :, None]
    out = probs.reshape(B, n_kv, groups, T, S) @ v
    return out.reshape(B, n_heads, T, D).astype(queries.dtype)


def _batch_allowed(cache: BatchKVCache, offset: mx.array, T: int, S: int, window: Optional[int]) -> tuple[mx.array, dict[str, Any]]:
    """The mask [B, 1, T, S] of a left-padded batch (generation/batch.py) and its capture context.

    Row i's keys start at column `left_padding[i]`, its positions count from there, and its
    queries sit at its own offset. `row_keys` gives each row's first real column and key
    positions, so a capture of row i sees exactly the columns a batch-1 run has.
    """
    pads = cache.left_padding
    positions = mx.arange(S)[None, :] - pads[:, None]  # [B, S]
    query_pos = offset[:, None] + mx.arange(T)[None, :]  # [B, T]
    keys_pos, q = positions[:, None, :], query_pos[:, :, None]
    allowed = (keys_pos >= 0) & (keys_pos <= q)
    if window is not None:
        allowed = allowed & (keys_pos > q - window)
    row_keys = [(p, mx.arange(S - p)) for p in pads.tolist()]
    return allowed[:, None], {"row_keys": row_keys}


def _batch_window_allowed(cache: BatchRotatingKVCache, offset: mx.array, T: int, S: int, window: Optional[int]) -> tuple[mx.array, dict[str, Any]]:
    """The mask [B, 1, 1, S] of a batch's ring of window slots after a one-token update, and its capture context.

    Rows are decoded together one token at a time (they prefill alone), so every row wrote
    its newest key into the same slot, `_idx - 1`; reading the ring from `_idx` (or from 0
    before it wraps) gives every row's keys in temporal order, and the key `d` columns before
    the newest one is row i's position `offset[i] - d`. Negative positions are the row's left
    padding; positions at or before `offset[i] - window` are outside its window. `row_keys`
    gives each row its own columns in temporal order, as a lone run's ring cache has them.
    """
    if T != 1:
        raise ValueError(f"a batch of sliding-window rows decodes one token a step, got {T} new positions")
    window = window if window is not None else cache.max_size
    order = (mx.arange(S) + cache._idx) % S if cache.rotated else mx.arange(S)
    back = mx.zeros((S,), dtype=mx.int32)
    back[order] = mx.arange(S - 1, -1, -1, dtype=mx.int32)  # column -> how many keys before the newest
    positions = offset[:, None] - back[None, :]  # [B, S]
    first = mx.maximum(offset - window + 1, 0)[:, None]
    allowed = positions >= first
    row_keys = []
    ordered = positions[:, order]
    for i, (q, lo) in enumerate(zip(offset.tolist(), first[:, 0].tolist())):
        n = q - lo + 1  # the row's keys: the last n columns in temporal order
        if n > S:
            raise RuntimeError(f"row {i} of a sliding-window batch has {n} keys in its window but the ring holds {S}")
        row_keys.append((order[S - n :], ordered[i, S - n :]))
    return allowed[:, None, None, :], {"row_keys": row_keys}


def layer_masks(x: mx.array, caches: list[Any], layers: list[Any], window: Optional[int]) -> list[Union[None, str, mx.array]]:
    """Each layer's attention mask for this forward, one per attention kind (`layer.layer_type`).

    Made before any cache is updated this step, from the first cache of each kind, as mlx-lm
    builds them; sliding-window layers get the window.
    """
    by_kind: dict[str, Union[None, str, mx.array]] = {}
    masks = []
    for layer, cache in zip(layers, caches):
        kind = layer.layer_type
        if kind not in by_kind:
            by_kind[kind] = create_attention_mask(x, cache, window_size=window if kind == "sliding_attention" else None)
        masks.append(by_kind[kind])
    return masks
