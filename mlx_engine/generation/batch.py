"""Continuous batching: several generations of one model decoded together, one forward a step.

Each request prefills alone (batch 1, the loop's own `prefill`, which also records its
prompt captures), then its KV cache joins the running batch: mlx-lm's BatchKVCache
left-pads the rows to a common length and masks the padding, and each row's RoPE offset
is its own (`cache.offset` is then an array, one entry per row). A row leaves between
two steps when it finishes; with one row left the cache goes back to a plain KVCache, so
a lone request runs the same forward as `token_steps`.

What makes a row independent of its batch mates:
- sampling: each row has its own KeyedSampler (its own random stream, temperature, top_p);
- hooks and edits: one dispatcher per armed HookPoint hands row i's slice `x[i:i+1]` to
  row i's HookSession, so a capture sees its own row and an edit changes its own row only;
- stop strings, max_tokens and the capture budget are the row's own (TextStream, the caller).

- attention scores and patterns: models/attention.py masks each row's padding and hands
  the dispatcher each row's first real key column, so a row's capture has the columns
  and key positions of a lone run (one such capture makes the batch's attention explicit).

Sliding-window layers (gpt-oss, Mistral) keep a RotatingKVCache per row; joined, they become mlx-lm's
BatchRotatingKVCache, a ring of `window` slots whose mask counts each row's own positions
(its left padding is never inside its window), and models/attention.py gives each row's
captures its own window's columns in temporal order, as a lone run's ring cache does.

Batched matmuls may differ from batch 1 in the last bits, so a row's logits agree with a
lone run within float32 rounding, not bit for bit. GPT-2 (learned positions read one
offset), mlx-lm's fallback classes, and sliding-window architectures not yet proven to
batch (Gemma 2/3) are not batched: `batchable` says so and the server runs their
requests alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from ..hooks.capture import Capture, StepActivations
from ..hooks.names import ResolvedHook
from ..hooks.point import HookPoint
from ..hooks.session import HookBusyError, HookSession
from ..interventions.ops import BoundIntervention
from ..loading import ModelKit
from .api import sampling_args, step_result
from .loop import (
    Sampling,
    TokenStep,
    check_prompt,
    choose,
    enqueue,
    group_captures,
    head_kwargs,
    prefill,
    read_top,
    sampler_for,
)
from .prefix_cache import PrefixCache
from .text import TextStream
from .types import GenerationResult

# Sites that a batch captures per row (models/attention.py: `row_keys`) but cannot edit per row.
_EXPLICIT = ("attention_scores", "attention_pattern")
# Architectures whose position embedding reads `cache.offset` as one integer.
_SCALAR_OFFSET = {"gpt2"}
# Architectures whose sliding-window layers are proven to batch as they run alone (tests/test_server_batching_window.py):
# their RotatingKVCaches merge into mlx-lm's BatchRotatingKVCache, each row's window over its own positions.
_WINDOW_PROVEN = {"gpt_oss", "mistral"}

OnStep = Callable[[GenerationResult, StepActivations], bool]
OnEnd = Callable[[Optional[BaseException]], None]


def model_batchable(kit: ModelKit) -> bool:
    """Whether rows of this model can share a forward: native, per-row RoPE offsets, and caches
    that merge into a batch (plain KV caches; rotating ones where the architecture is proven)."""
    model_type = kit.arch_info.model_type
    if not kit.native or model_type in _SCALAR_OFFSET:
        return False
    for c in make_prompt_cache(kit.model):
        rotating = type(c) is RotatingKVCache and c.keep == 0 and model_type in _WINDOW_PROVEN
        if not (type(c) is KVCache or rotating):
            return False
    return True


def batchable(kit: ModelKit, hooks: Sequence[ResolvedHook], edits: Sequence[BoundIntervention]) -> bool:
    """Whether this request may join a batch (see the module docstring for who may not)."""
    if not model_batchable(kit):
        return False
    return not any(e.site.endswith(_EXPLICIT) for e in edits)


def reusable_prefix(prompt_len: int, hooks: Sequence[ResolvedHook], edited: bool, chunk: int) -> int:
    """How many leading prompt positions may come from a stored KV cache.

    None with interventions (they may change the KV of any position); with captures, only
    positions before the first one a capture asks for; always one short of the prompt. A
    "last" capture is taken at the end of each prefill chunk, so it allows reuse only
    when the prompt is one chunk (the chunks then end where they would have).
    """
    if edited:
        return 0
    limit = prompt_len - 1
    for h in hooks:
        if h.positions is None or (h.positions == "last" and prompt_len > chunk):
            return 0
        if h.positions != "last":
            limit = min(limit, min(h.positions, default=limit))
    return max(limit, 0)


@dataclass
class _Pass:
    """A pass enqueued for a row and not yet read: token `n` with its logprobs and captures."""

    token: mx.array
    picked: tuple[mx.array, ...]
    captures: list[Capture]
    n: int


class BatchRow:
    """One request in a batch: its session, sampler, text stream and the tokens it fed."""

    def __init__(self, kit: ModelKit, prompt: Sequence[int], session: HookSession, sampling: Sampling, stop: tuple[str, ...]) -> None:
        self.kit = kit
        self.n_prompt = len(prompt)
        self.session = session
        self.sampling = sampling
        self.sampler = sampler_for(sampling)
        self.text = TextStream(kit.tokenizer.detokenizer, kit.eos_token_ids, stop, sampling.max_tokens)
        self.cache: Optional[list[Any]] = None  # its own KV cache until it joins a batch
        self.cached_tokens = 0
        self.inflight: Optional[_Pass] = None
        self.fed: Optional[mx.array] = None  # the last token read out, when no pass is in flight
        self.fed_n = 0
        self.on_step: Optional[OnStep] = None
        self.on_end: Optional[OnEnd] = None
        self._tic = time.perf_counter()
        self._gen_tic = self._tic
        self.prompt_tps = 0.0

    def start(self, prefix: Optional[PrefixCache], prompt: Sequence[int], should_stop: Optional[Callable[[], bool]]) -> tuple[GenerationResult, StepActivations]:
        """Prefill alone (reusing a stored prefix where allowed) and read the first token."""
        kit, s = self.kit, self.sampling
        check_prompt(prompt, s.max_tokens, kit.arch_info.vocab_size)
        cache, start = None, 0
        if prefix is not None:
            start, cache = prefix.lookup(id(kit), prompt, reusable_prefix(len(prompt), self.session.resolved, self._edits, s.prefill_step_size))
        cache = cache or make_prompt_cache(kit.model)
        self.cached_tokens = start
        self.session.arm()
        try:
            logits, step0 = prefill(kit, prompt, self.session, s, cache, start, should_stop)
        finally:
            self.session.disarm()
        token, logprobs = choose(self.sampler, logits)
        picked = enqueue(token, logprobs, step0, s.top_logprobs)
        if prefix is not None and not self._edits:
            prefix.store(id(kit), prompt, cache)
        self.cache = cache
        self.prompt_tps = self.n_prompt / (time.perf_counter() - self._tic)
        self._gen_tic = time.perf_counter()
        return self._read(_Pass(token, picked, step0, 0))

    @property
    def _edits(self) -> bool:
        return self.session.edits

    def _read(self, p: _Pass) -> tuple[GenerationResult, StepActivations]:
        """Read one pass back (this waits for it) and turn it into the caller's result."""
        token_id = p.token.item()
        elapsed = time.perf_counter() - self._gen_tic
        step = TokenStep(
            token=token_id,
            step=p.n,
            logprob=float(p.picked[0].item()),
            top_logprobs=read_top(p.picked),
            activations=group_captures(p.captures),
            prompt_tps=self.prompt_tps,
            generation_tps=(p.n + 1) / elapsed if elapsed > 0 else 0.0,
        )
        self.fed, self.fed_n = p.token, p.n
        return step_result(step, self.text, self.n_prompt), step.activations

    def wants_pass(self) -> bool:
        n = self.inflight.n if self.inflight is not None else self.fed_n
        return n + 1 < self.sampling.max_tokens


def start_row(
    kit: ModelKit,
    prompt: Sequence[int],
    hooks: Sequence[ResolvedHook],
    edits: Sequence[BoundIntervention],
    *,
    prefix: Optional[PrefixCache] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    **generation_kwargs: Any,
) -> tuple[BatchRow, tuple[GenerationResult, StepActivations]]:
    """A row for `prompt`, prefilled, with its first token (hooks resolved, edits bound already)."""
    sampling, stop = sampling_args(generation_kwargs)
    row = BatchRow(kit, prompt, HookSession(kit.hook_points, hooks, edits), sampling, stop)
    return row, row.start(prefix, prompt, should_stop)


class _RowHooks:
    """One dispatcher per HookPoint any row arms: row i's slice goes to row i's session."""

    def __init__(self, rows: Sequence[BatchRow]) -> None:
        self._points: dict[int, HookPoint] = {}
        self._by_point: dict[int, list[tuple[int, Any]]] = {}
        for i, row in enumerate(rows):
            for point, fn in row.session.handlers():
                self._points[id(point)] = point
                self._by_point.setdefault(id(point), []).append((i, fn))

    def arm(self) -> None:
        for point in self._points.values():
            if point.fn is not None:
                raise HookBusyError(f"Hook point {point.name} is already armed by another session on this model.")
            point.fn = self._dispatch

    def disarm(self) -> None:
        for point in self._points.values():
            if point.fn == self._dispatch:
                point.fn = None

    def _dispatch(self, hp: HookPoint, x: mx.array, context: dict[str, Any]) -> mx.array:
        batch = x.shape[0]
        entries = self._by_point[id(hp)]
        if batch == 1 and "row_keys" not in context:
            return entries[0][1](hp, x, context)
        rows: Optional[list[mx.array]] = None
        row_keys = context.pop("row_keys", None)
        for i, fn in entries:
            xi = x[i : i + 1]
            ctx = {k: v[i : i + 1] if isinstance(v, mx.array) and v.ndim and v.shape[0] == batch else v for k, v in context.items()}
            if row_keys is not None:
                # Scores or a pattern over left-padded keys: the row sees its own columns only
                # (a slice start for a plain cache, column indices in temporal order for a ring).
                columns, ctx["key_positions"] = row_keys[i]
                xi = xi[..., columns:] if isinstance(columns, int) else mx.take(xi, columns, axis=-1)
                if fn(hp, xi, ctx) is not xi:
                    raise RuntimeError(f"{hp.name}: attention scores and patterns can be captured in a batch, not edited")
                continue
            yi = fn(hp, xi, ctx)
            if yi is not xi:
                rows = rows or [x[j : j + 1] for j in range(batch)]
                rows[i] = yi
        return x if rows is None else mx.concatenate(rows, axis=0)


class BatchDecoder:
    """The running batch of one model: its rows, their joint KV cache, one decode step at a time."""

    def __init__(self, kit: ModelKit) -> None:
        self.kit = kit
        self.rows: list[BatchRow] = []
        self._cache_rows: list[BatchRow] = []  # the rows of `_caches`, in order
        self._caches: Optional[list[Any]] = None  # plain KVCaches for one row, BatchKVCaches for more
        self.largest = 0

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, row: BatchRow, on_step: OnStep, on_end: OnEnd) -> None:
        """Add a prefilled row whose first token was handed out; it decodes from the next step."""
        assert row.cache is not None
        row.on_step, row.on_end = on_step, on_end
        self._keep([r for r in self._cache_rows if r in self.rows])
        if self._caches is None:
            self._caches = row.cache
        elif len(self._cache_rows) == 1:
            # KVCache.merge makes a BatchKVCache, RotatingKVCache.merge a BatchRotatingKVCache.
            self._caches = [type(a).merge([a, b]) for a, b in zip(self._caches, row.cache)]
        else:
            for batch, own in zip(self._caches, row.cache):
                batch.extend(type(own).merge([own]))
        row.cache = None
        self._cache_rows.append(row)
        self.rows.append(row)
        self.largest = max(self.largest, len(self.rows))

    def _keep(self, rows: list[BatchRow]) -> None:
        """Shrink the cache to `rows` (a subsequence of its rows, in order)."""
        if rows == self._cache_rows:
            return
        if not rows:
            self._caches = None
        elif len(self._cache_rows) > 1:
            keep = mx.array([self._cache_rows.index(r) for r in rows])
            for c in self._caches or []:
                c.filter(keep)
            if len(rows) == 1:
                self._caches = [c.extract(0) for c in self._caches or []]
        self._cache_rows = rows

    def step(self) -> None:
        """Enqueue the next pass of every row that needs one, then hand out what is in flight."""
        going = [r for r in self.rows if r.wants_pass()]
        self._keep(going)
        queued: dict[int, _Pass] = {}
        if going:
            queued = self._forward(going)
        for row in list(self.rows):
            p = row.inflight
            row.inflight = queued.get(id(row))
            if p is None:
                continue
            try:
                result, acts = row._read(p)
                done = row.on_step(result, acts) if row.on_step is not None else True
            except BaseException as exc:  # the reader left, or its handler failed: this row ends
                self._end(row, exc)
                continue
            if done or not (row.inflight is not None or row.wants_pass()):
                self._end(row, None)

    def _forward(self, rows: list[BatchRow]) -> dict[int, _Pass]:
        feed = [r.inflight.token if r.inflight is not None else r.fed for r in rows]
        ns = [r.inflight.n if r.inflight is not None else r.fed_n for r in rows]
        tokens = feed[0].reshape(1)[None] if len(rows) == 1 else mx.stack([t.reshape(1) for t in feed])
        for r, n in zip(rows, ns):
            r.session.begin_pass(n + 1, r.n_prompt + n, r.n_prompt + n + 1)
        hooks = _RowHooks(rows)
        hooks.arm()
        try:
            logits = self.kit.model(tokens, cache=self._caches, **head_kwargs(self.kit))[:, -1, :]
        finally:
            hooks.disarm()
        out: dict[int, _Pass] = {}
        for i, (r, n) in enumerate(zip(rows, ns)):
            captures = r.session.end_pass()
            token, logprobs = choose(r.sampler, logits if len(rows) == 1 else logits[i : i + 1])
            out[id(r)] = _Pass(token, enqueue(token, logprobs, captures, r.sampling.top_logprobs), captures, n + 1)
        return out

    def _end(self, row: BatchRow, error: Optional[BaseException]) -> None:
        self.rows.remove(row)
        row.inflight = None
        if not self.rows:
            self._keep([])
        if row.on_end is not None:
            row.on_end(error)

    def close(self, error: BaseException) -> None:
        """End every row with `error` (the engine is stopping, or a step failed)."""
        for row in list(self.rows):
            self._end(row, error)
        self._keep([])

