"""Attention's softmax on every core of the CPU, when MLX runs on its CPU backend.

MLX's CPU backend runs each op on its stream's one thread, and on Linux it evaluates
transcendentals element by element: at a long prompt the softmax inside attention is most
of a prefill (`python -m benchmarks.prefill_ops`: softmax 16x torch at 4096 tokens, while
the matmuls, which go to a multithreaded BLAS, are at parity). MLX gives every stream its
own thread, so this module cuts a prefill chunk's queries into blocks of rows and spreads
them over one CPU stream per core. Under a causal mask a block reads only the keys up to
its last query, which also skips the masked corner the fused kernel would compute.

Each row sees the same kernel over the same keys (the columns cut off are the ones its mask
removes), so the output equals the unsplit call's to float rounding
(tests/test_cpu_parallel_attention.py). Nothing changes on a GPU backend, for a one-token
decode step, or with `MLX_ENGINE_CPU_STREAMS=1`.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Callable, Optional, Union

import mlx.core as mx

STREAMS_VARIABLE = "MLX_ENGINE_CPU_STREAMS"
MAX_STREAMS = 8
# Below this many score cells (heads x queries x keys) the split costs more than it saves.
MIN_CELLS = 1 << 18
MAX_BLOCK_ROWS = 256
MIN_BLOCK_ROWS = 64


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def cpu_streams() -> tuple[mx.Stream, ...]:
    """One CPU stream per core this process may use (at most MAX_STREAMS), or none.

    `MLX_ENGINE_CPU_STREAMS` sets the count (1 turns the split off). Made once per process:
    MLX keeps a stream's thread for the life of the process.
    """
    wanted = os.environ.get(STREAMS_VARIABLE, "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"{STREAMS_VARIABLE} must be a whole number of streams, 1 or more (1 turns the split off); got {wanted!r}")
        count = int(wanted)
    else:
        count = min(_cores(), MAX_STREAMS)
    if count < 2:
        return ()
    return tuple(mx.new_stream(mx.cpu) for _ in range(count))


def _worth_splitting(n_rows: int, n_cells: int) -> bool:
    """Rows to spread, enough work to pay for it, and a CPU backend with streams to spread it over."""
    if n_rows < 2 or n_cells < MIN_CELLS:
        return False
    return mx.default_device() == mx.cpu and len(cpu_streams()) > 1


def _blocks_of(n_rows: int, n_streams: int, per_stream: int) -> list[tuple[int, int]]:
    """`per_stream` blocks of query rows for each stream, of MIN_BLOCK_ROWS to MAX_BLOCK_ROWS rows."""
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, math.ceil(n_rows / (per_stream * n_streams))))
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def _assign(loads: list[int], n_streams: int) -> tuple[list[int], int]:
    """Stream index per block, largest block first onto the least loaded stream; and the largest stream load."""
    totals = [0] * n_streams
    chosen = [0] * len(loads)
    for i in sorted(range(len(loads)), key=lambda j: -loads[j]):
        s = min(range(n_streams), key=totals.__getitem__)
        chosen[i] = s
        totals[s] += loads[i]
    return chosen, max(totals)


@lru_cache(maxsize=256)
def _causal_plan(n_rows: int, n_keys: int, n_streams: int, causal: bool) -> tuple[tuple[int, int, int, int], ...]:
    """(first row, end row, keys read, stream) per block; made once per chunk shape, not per layer.

    Every block costs a few ops, so the fewest blocks win, as long as the busiest stream
    carries at most 10% more than an even share: a causal chunk's last rows read more keys
    than its first, so a chunk over few earlier keys needs more, smaller blocks to even out.
    """
    plan: tuple[tuple[int, int, int, int], ...] = ()
    for per_stream in (1, 2, 4):
        blocks = _blocks_of(n_rows, n_streams, per_stream)
        spans = [n_keys - (n_rows - end) if causal else n_keys for _, end in blocks]
        loads = [(end - start) * span for (start, end), span in zip(blocks, spans)]
        chosen, busiest = _assign(loads, n_streams)
        plan = tuple((start, end, span, s) for (start, end), span, s in zip(blocks, spans, chosen))
        if busiest <= 1.1 * sum(loads) / n_streams:
            break
    return plan


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: Union[None, str, mx.array] = None,
    sinks: Optional[mx.array] = None,
) -> mx.array:
    """`mx.fast.scaled_dot_product_attention`, with a long chunk's query rows spread over the CPU's cores.

    A "causal" mask aligns the queries with the last keys (mlx-lm's convention), so rows
    [a, b) of T queries over S keys read keys [0, S - (T - b)). An array mask is sliced to
    the block's rows and keeps every key column.
    """
    n_rows, n_keys = queries.shape[2], keys.shape[2]
    if not _worth_splitting(n_rows, queries.shape[1] * n_rows * n_keys):
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    streams = cpu_streams()
    causal = isinstance(mask, str) and mask == "causal"
    outs = []
    for start, end, span, s in _causal_plan(n_rows, n_keys, len(streams), causal):
        block_mask = mask
        if isinstance(mask, mx.array):
            block_mask = mask[..., start:end, :] if mask.ndim >= 2 and mask.shape[-2] == n_rows else mask
        outs.append(
            mx.fast.scaled_dot_product_attention(
                queries[:, :, start:end], keys[:, :, :span], values[:, :, :span],
                scale=scale, mask=block_mask, sinks=sinks, stream=streams[s],
            )
        )
    return mx.concatenate(outs, axis=2)


def rowwise(fn: Callable[[mx.array], mx.array], x: mx.array, axis: int = 2) -> mx.array:
    """`fn(x)` for a function of independent rows along `axis`, blocks of rows spread over the CPU streams.

    The explicit attention path's softmax goes through here: each query row's softmax over
    its keys needs no other row.
    """
    n_rows = x.shape[axis]
    if x.ndim < 3 or not _worth_splitting(n_rows, x.size):
        return fn(x)
    streams = cpu_streams()
    outs = []
    for i, (start, end) in enumerate(_blocks_of(n_rows, len(streams), 1)):
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, end)
        with mx.stream(streams[i % len(streams)]):
            outs.append(fn(x[tuple(index)]))
    return mx.concatenate(outs, axis=axis)
