"""`extract`: run a model over a corpus and write an activation store (layout: store/layout.md).

Everything that can be refused is checked before the output folder is touched
(store/lifecycle.py). The folder must then be new, empty, or a store with the same
settings fingerprint, which resumes after its last committed shard: the batch stream is
replayed without running the model up to that point, the statistics are restored from
the state saved with that shard, and the uninterrupted and the resumed runs end with the
same rows, documents and statistics.

`start_extraction` does all of that and returns an `Extraction` to step one batch at a
time (the HTTP server interleaves it with other requests; store/run.py runs the pass).
In a distributed job (world size > 1) `extract` runs every rank's part: data-parallel
(store/data_parallel.py, each rank with the whole model) or, for a model split over the
ranks, model-parallel (store/model_parallel.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..hooks.names import HookRequest
from ..hooks.session import HookBusyError
from ..loading import ModelKit, load_model
from .data_parallel import extract_ranks
from .errors import StoreError
from .lifecycle import (
    finalize,
    fresh_states,
    open_store,
    options_of,
    prepare,
    split_mode,
)
from .manifest import MANIFEST
from .model_parallel import extract_model_parallel
from .ranks import RANK_TIMEOUT_S, RankGroup
from .reader import ActivationStore
from .recorder import StoredHook
from .run import ExtractionRun


class Extraction:
    """A prepared extraction of one process: the store is created (or resumed) and `step()` runs one batch.

    `extract` runs it to the end; the server steps it between other jobs. `finish()`
    writes the statistics and marks the store complete; `abort()` leaves it resumable.
    """

    def __init__(self, out: Path, manifest: dict[str, Any], stored: list[StoredHook], run: Optional[ExtractionRun]) -> None:
        self.out, self.manifest, self.stored, self.run = out, manifest, stored, run

    @property
    def complete(self) -> bool:
        return self.manifest["status"] == "complete"

    def step(self) -> bool:
        """One batch; False when every batch is done (then call `finish`)."""
        if self.run is None or self.run.finished:
            return False
        try:
            return self.run.step()
        except HookBusyError:  # raised before the batch was taken: the store is as it was, call again
            raise
        except BaseException:
            self.run.abort()
            raise

    def finish(self) -> ActivationStore:
        if not self.complete:
            assert self.run is not None and self.run.finished, "finish() before every batch ran"
            finalize(self.out, self.manifest, self.stored, self.run.writer.states, self.run.documents_done)
        return ActivationStore.open(self.out)

    def abort(self) -> None:
        if self.run is not None:
            self.run.abort()


def start_extraction(
    kit: Union[ModelKit, str, Path], documents: Any, hooks: Iterable[HookRequest], out_dir: Union[str, Path], *,
    text_field: str = "text", progress: bool = False, queue_size: int = 4, **options: Any,
) -> Extraction:
    """Check everything, create or resume the store in `out_dir`, and return it ready to step (one process)."""
    kit, stored, corpus, summary, settings = prepare(kit, documents, hooks, options_of(**options), text_field, RankGroup(None, 0, 1))
    out = Path(out_dir).expanduser()
    manifest = open_store(out, kit, stored, summary, settings)
    if manifest["status"] == "complete":
        return Extraction(out, manifest, stored, None)
    states = fresh_states(stored, manifest, out, settings)
    run = ExtractionRun(kit, corpus, stored, out, manifest, states, settings, total_documents=summary.documents,
                        record=MANIFEST, progress=progress, queue_size=queue_size)
    return Extraction(out, manifest, stored, run)


def extract(
    kit: Union[ModelKit, str, Path],
    documents: Any,
    hooks: Iterable[HookRequest],
    out_dir: Union[str, Path],
    *,
    context_size: int = 1024,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    dtype: str = "float32",
    text_field: str = "text",
    packed: bool = False,
    shard_tokens: Optional[int] = None,
    top_k: int = 20,
    active_threshold: float = 0.0,
    progress: bool = True,
    queue_size: int = 4,
    rank_timeout_s: float = RANK_TIMEOUT_S,
    parallel: Optional[str] = None,
) -> Optional[ActivationStore]:
    """Write every row of `hooks` over `documents` to the store `out_dir` and return it, opened.

    `documents`: a path (see store/corpus.py for the formats), a list of strings or of
    dicts with `text_field`, or a datasets.Dataset. Documents longer than `context_size`
    tokens are cut into windows; `packed` packs documents into full windows instead
    (rows then differ from per-document runs). `shard_tokens` rows per shard (default:
    about 256 MiB per shard). An existing store with the same settings is resumed (or,
    if complete, returned at once); one with other settings is refused.

    Run as a distributed job (`mlx.launch`, or MLX_RANK and MLX_HOSTFILE; world size > 1),
    every rank runs its share of the batches into the same folder and rank 0 writes the
    one manifest (store/ranks.py). Ranks other than 0 return the store when the folder is
    shared with rank 0, else None (their shards are to be copied into rank 0's folder).
    A rank that waits longer than `rank_timeout_s` seconds for the others in one step
    concludes that one has stopped and exits with status 1 (store/ranks.py); a legitimate
    wait is another rank finishing its last chunks, so keep it well above a shard's time.

    `parallel="tensor"` or `"pipeline"` (with `kit` a path), or a ModelKit loaded with
    `load_model(..., parallel=...)`, splits the model over the job's ranks instead: every
    rank runs every batch in step with the others and rank 0 alone writes the store
    (store/model_parallel.py), for a model that does not fit one machine. In a process
    that is not part of a distributed job, `parallel` changes nothing.
    """
    options = options_of(context_size, batch_size, max_tokens, dtype, packed, shard_tokens, top_k, active_threshold)
    if isinstance(rank_timeout_s, bool) or not isinstance(rank_timeout_s, (int, float)) or not 0 < rank_timeout_s < float("inf"):
        raise StoreError(f"rank_timeout_s must be a positive number of seconds, got {rank_timeout_s!r}.")
    ranks = RankGroup.current()
    if ranks.distributed:
        runs: list[ExtractionRun] = []  # the settle step of a timeout: stop the writer, its commit in progress done
        ranks = ranks.bounded(rank_timeout_s, settle=lambda: [run.abort() for run in runs])
        try:
            if parallel is not None or (isinstance(kit, ModelKit) and split_mode(kit) is not None):
                return extract_model_parallel(kit, documents, hooks, out_dir, options, text_field, ranks, parallel, progress,
                                              queue_size, runs)
            return extract_ranks(kit, documents, hooks, out_dir, options, text_field, ranks, progress, queue_size, runs)
        finally:
            ranks.close()
    if parallel is not None and not isinstance(kit, ModelKit):
        kit = load_model(kit, parallel=parallel)  # a world of one: the whole model, today's path
    job = start_extraction(kit, documents, hooks, out_dir, text_field=text_field, progress=progress, queue_size=queue_size, **options)
    if job.run is not None:
        job.run.run_to_end()
    return job.finish()
