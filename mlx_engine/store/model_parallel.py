"""Model-parallel extraction: one store from a model split over the job's ranks (tensor or pipeline).

Each rank holds a part of the model (`load_model(..., parallel=...)`), so every forward
pass is a collective: all ranks run the same batches, in the same order, with the same
hooks armed. Rank 0 alone owns the store: it creates or resumes it and runs the one-process
ExtractionRun (rows, statistics, shards, manifest: the store is a one-process store). The
other ranks run a `ModelFollower`: the same batch stream from rank 0's resume point, the
same forward passes and evaluations, nothing kept. Captured sites are whole on rank 0: a
tensor-parallel site is gathered from every rank (recorder.py); a pipeline site of a block
another rank holds is sent to rank 0 and recorded there (distributed/pipeline.py).

Agreement (RankGroup, store/ranks.py): before each forward every rank says whether it can
go on, so a failure on one rank (a write error on rank 0, an interrupt) stops the others
at the next batch with an error naming the failed rank, instead of leaving them inside a
collective no one joins. Every agreement and every forward pass is bounded by the job's
rank timeout: a rank whose peer died or froze mid-pass exits 1 after `rank_timeout_s`
(rank 0 with its committed shards intact), and the same command resumes. The one window
not covered by agreement is a failure inside a forward pass itself (the ranks' collectives
then no longer pair up): the timeout ends it.

The settings (checkpoint, corpus, hooks, options) are compared between ranks first, so
ranks started with different arguments or files are refused before any folder is touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Union

from ..hooks.names import HookRequest
from ..loading import ModelKit
from .corpus import Corpus
from .errors import StoreError
from .lifecycle import (
    finalize,
    fresh_states,
    open_if_here,
    open_store,
    prepare,
)
from .manifest import MANIFEST, fingerprint
from .ranks import RankFailedError, RankGroup
from .reader import ActivationStore
from .recorder import StoredHook
from .run import ExtractionRun, batch_plan, recorder_for

FINGERPRINT_INTS = 4  # the settings fingerprint's first 16 hex digits as int32s: what the ranks compare


def forward_guard(ranks: RankGroup) -> Callable[[int], ContextManager[None]]:
    """Around each forward pass: agree to go on, then the pass bounded by the rank timeout."""

    @contextmanager
    def guard(index: int) -> Iterator[None]:
        ranks.agree(None, f"extracting (before batch {index})")
        with ranks.waiting(f"the forward pass of batch {index}"):
            yield

    return guard


class ModelFollower:
    """A rank other than 0: rank 0's forward passes, batch for batch, with nothing kept."""

    def __init__(self, kit: ModelKit, corpus: Corpus, stored: list[StoredHook], options: dict[str, Any], skip: int,
                 guard: Callable[[int], ContextManager[None]]) -> None:
        self.kit, self.skip, self.guard = kit, skip, guard
        self.recorder = recorder_for(kit, stored, options)  # rank 0's recorder and batches (run.py)
        self._plan = batch_plan(kit, corpus, options)

    def run_to_end(self) -> None:
        self.recorder.arm()
        try:
            for batch in self._plan:
                if batch.index < self.skip or not batch.windows:
                    continue  # committed by rank 0 before this run, or nothing to run: rank 0 skips it too
                with self.guard(batch.index):
                    self.recorder.run(self.kit.model, [w.tokens for w in batch.windows], keep=False)
        finally:
            self.recorder.disarm()


def _fingerprint_ints(settings: dict[str, Any]) -> list[int]:
    digits = fingerprint(settings)[: 4 * FINGERPRINT_INTS]
    return [int(digits[i : i + 4], 16) for i in range(0, len(digits), 4)]


def extract_model_parallel(
    kit: Union[ModelKit, str, Path], documents: Any, hooks: Iterable[HookRequest], out_dir: Union[str, Path],
    options: dict[str, Any], text_field: str, ranks: RankGroup, parallel: Optional[str], progress: bool, queue_size: int,
    runs: Optional[list[ExtractionRun]] = None,
) -> Optional[ActivationStore]:
    """`extract` on one rank of a model-parallel job; rank 0 returns the store, the others it where they see it."""
    out, r = Path(out_dir).expanduser(), ranks.rank
    error: Optional[BaseException] = None
    try:
        kit, stored, corpus, summary, settings = prepare(kit, documents, hooks, options, text_field, ranks, parallel)
        if "model_parallel" not in settings:
            raise StoreError("A model-parallel extraction needs the model split over the job's ranks: pass its path with "
                             "parallel='tensor' or 'pipeline', or a ModelKit from load_model(..., parallel=...).")
    except BaseException as exc:
        error = exc
    ranks.agree(error, "checking the input")
    prints = ranks.exchange(_fingerprint_ints(settings), "comparing the settings")
    if (prints != prints[0]).any():
        raise StoreError("The ranks of the model-parallel job differ in checkpoint, corpus, hooks or options (their "
                         "settings fingerprints differ): start every rank with the same command and the same files.")
    manifest: Optional[dict[str, Any]] = None
    complete, skip = 0, 0
    if r == 0:  # rank 0 alone owns the folder
        try:
            manifest = open_store(out, kit, stored, summary, settings)
            complete = int(manifest["status"] == "complete")
            shards = manifest["shards"]
            skip = shards[-1]["batches_end"] if shards else 0
        except BaseException as exc:
            error = exc
    status = ranks.exchange([int(error is not None), complete, skip], "opening the store folder")
    if error is not None:
        raise error
    if status[0, 0]:
        raise StoreError(f"Rank 0 of the model-parallel job refused the store folder {out}; its log says why.")
    if status[0, 1]:
        return open_if_here(out)
    guard = forward_guard(ranks)
    run: Optional[ExtractionRun] = None
    try:
        if r == 0:
            assert manifest is not None
            states = fresh_states(stored, manifest, out, settings)
            run = ExtractionRun(kit, corpus, stored, out, manifest, states, settings, total_documents=summary.documents,
                                record=MANIFEST, progress=progress, queue_size=queue_size, forward_guard=guard)
            if runs is not None:
                runs.append(run)
            run.run_to_end()
        else:
            ModelFollower(kit, corpus, stored, settings, int(status[0, 2]), guard).run_to_end()
    except RankFailedError:
        raise  # another rank's failure, learned at a batch's agreement: that rank has already ended the job
    except BaseException as exc:
        error = exc
    ranks.agree(error, "extracting its batches")
    if r == 0:
        try:
            assert run is not None and manifest is not None
            finalize(out, manifest, stored, run.writer.states, run.documents_done)
        except BaseException as exc:
            error = exc
    ranks.agree(error, "writing the manifest")
    return open_if_here(out)
