"""Which generations the engine thread decodes together, and what it has seen doing so.

The engine thread (engine.py) runs queued jobs in order; a generation job that may be
batched (generation/batch.py: `batchable`) prefills its prompt at once and then joins
its model's running batch here instead of holding the thread until it ends. Between two
decode steps the engine takes the next queued job, so a request joins while others
decode, and one leaves as soon as it finishes. At most `max_batch_size` rows decode at a
time (over all models); while the batch is full, queued jobs wait, as they did behind a
single generation. Requests that may not be batched run alone, between two steps.

The prompt cache (generation/prefix_cache.py) is shared by every model's rows; an
unloaded model's entries go with it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..generation.batch import BatchDecoder, BatchRow, OnEnd, OnStep, batchable, start_row
from ..generation.prefix_cache import PrefixCache
from ..generation.types import GenerationResult
from ..hooks.capture import StepActivations
from ..hooks.names import ResolvedHook
from ..interventions.ops import BoundIntervention
from ..loading import ModelKit


@dataclass
class BatchingStats:
    largest_batch: int = 0  # the most rows one decode step has run
    decode_steps: int = 0
    batched_steps: int = 0  # of the decode steps: those with more than one row
    solo_generations: int = 0  # requests that could not join a batch and ran alone


class Batcher:
    """The running batches (one per model), the prompt cache, and their limits."""

    def __init__(self, max_batch_size: int = 8, prompt_cache_bytes: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.prefix = PrefixCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self._decoders: dict[int, BatchDecoder] = {}
        self._watched: set[int] = set()
        self._freed: list[int] = []  # kits freed since the last open (any thread may free one)
        self.stats = BatchingStats()

    @property
    def rows(self) -> int:
        return sum(len(d) for d in list(self._decoders.values()))

    @property
    def active(self) -> bool:
        # Read by other threads too (health, shutdown): an empty batch leaves the dict at once.
        return bool(self._decoders)

    @property
    def full(self) -> bool:
        return self.rows >= self.max_batch_size

    def accepts(self, kit: ModelKit, hooks: Sequence[ResolvedHook], edits: Sequence[BoundIntervention]) -> bool:
        """Whether this request joins a batch; False: it runs alone (counted)."""
        ok = batchable(kit, hooks, edits)
        self.stats.solo_generations += not ok
        return ok

    def open(
        self,
        kit: ModelKit,
        prompt: Sequence[int],
        hooks: Sequence[ResolvedHook],
        edits: Sequence[BoundIntervention],
        should_stop: Optional[Callable[[], bool]],
        generation_kwargs: dict[str, Any],
    ) -> tuple[BatchRow, tuple[GenerationResult, StepActivations]]:
        """Prefill an accepted request (reusing a stored prefix where allowed) and read its first token."""
        while self._freed:
            key = self._freed.pop()
            self._watched.discard(key)
            if self.prefix is not None:
                self.prefix.forget(key)
        self._watch(kit)
        return start_row(kit, prompt, hooks, edits, prefix=self.prefix, should_stop=should_stop, **generation_kwargs)

    def join(self, row: BatchRow, on_step: OnStep, on_end: OnEnd) -> None:
        """Add an opened row to its model's batch; it decodes from the next step."""
        decoder = self._decoders.get(id(row.kit))
        if decoder is None:
            decoder = self._decoders[id(row.kit)] = BatchDecoder(row.kit)
        decoder.join(row, on_step, on_end)

    def step(self) -> None:
        """One decode step of every model's batch."""
        for key, decoder in list(self._decoders.items()):
            size = len(decoder)
            if size:
                self.stats.largest_batch = max(self.stats.largest_batch, size)
                self.stats.decode_steps += 1
                self.stats.batched_steps += size > 1
                try:
                    decoder.step()
                except BaseException as exc:  # a failed forward ends its batch's rows, not the engine
                    decoder.close(exc)
            if not len(decoder):
                del self._decoders[key]

    def close(self, error: BaseException) -> None:
        """End every row with `error` (the engine thread is stopping)."""
        for decoder in self._decoders.values():
            decoder.close(error)
        self._decoders.clear()

    def _watch(self, kit: ModelKit) -> None:
        # The prompt cache is keyed by the kit's identity: forget its entries when it is freed.
        if self.prefix is not None and id(kit) not in self._watched:
            self._watched.add(id(kit))
            # Only noted here: the cache itself is changed on the engine thread, in `open`.
            weakref.finalize(kit, self._freed.append, id(kit))
