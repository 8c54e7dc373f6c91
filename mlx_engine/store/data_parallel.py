"""Data-parallel extraction: `extract` on one rank of a job whose ranks each hold the whole model.

Every rank runs its share of the batches into the same folder (store/ranks.py says which
and how the ranks agree); rank 0 alone decides about the folder, and at the end merges
every rank's records and statistics into the one manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..hooks.names import HookRequest
from ..loading import ModelKit
from .corpus import CorpusSummary
from .errors import StoreError
from .lifecycle import (
    create_store,
    finalize,
    fresh_states,
    new_manifest,
    open_if_here,
    prepare,
)
from .manifest import (
    RANKS_DIR,
    SHARDS_DIR,
    STATE_DIR,
    discard_uncommitted,
    existing_manifest,
    fingerprint,
    rank_record,
)
from .ranks import RankGroup, merge_ranks, owner, pack_rank, unpack_rank
from .reader import ActivationStore
from .recorder import StoredHook
from .run import ExtractionRun


def extract_ranks(
    kit: Union[ModelKit, str, Path], documents: Any, hooks: Iterable[HookRequest], out_dir: Union[str, Path],
    options: dict[str, Any], text_field: str, ranks: RankGroup, progress: bool, queue_size: int,
    runs: Optional[list[ExtractionRun]] = None,
) -> Optional[ActivationStore]:
    """`extract` on one rank of a data-parallel job (store/ranks.py): every step agreed by all ranks.

    The run is appended to `runs` once it exists (what a bounded group's timeout settles).
    """
    out, r = Path(out_dir).expanduser(), ranks.rank
    error: Optional[BaseException] = None
    try:
        kit, stored, corpus, summary, settings = prepare(kit, documents, hooks, options, text_field, ranks)
    except BaseException as exc:
        error = exc
    ranks.agree(error, "checking the input")
    manifest, complete = None, 0
    if r == 0:  # rank 0 alone decides about the folder (it may be shared with the others)
        try:
            manifest = existing_manifest(out, settings)
            if manifest is None:
                manifest = new_manifest(kit, stored, summary, settings)
                create_store(out, manifest)
            complete = int(manifest["status"] == "complete")
        except BaseException as exc:
            error = exc
    status = ranks.exchange([int(error is not None), complete], "opening the store folder")
    if error is not None:
        raise error
    if status[0, 0]:
        raise StoreError(f"Rank 0 of the data-parallel job refused the store folder {out}; its log says why.")
    if status[0, 1]:
        return open_if_here(out)
    run: Optional[ExtractionRun] = None
    try:
        record = rank_record_of(kit, stored, summary, settings, out, r)
        states = fresh_states(stored, record, out, settings)
        chunk, world = settings["rank_chunk_batches"], ranks.size
        run = ExtractionRun(kit, corpus, stored, out, record, states, settings, total_documents=summary.documents,
                            record=rank_record(r), owns=lambda i: owner(i, chunk, world) == r,
                            chunk_end=lambda i: (i + 1) % chunk == 0, rank=r, progress=progress, queue_size=queue_size)
        if runs is not None:
            runs.append(run)
        run.run_to_end()
    except BaseException as exc:
        error = exc
    ranks.agree(error, "extracting its batches")
    assert run is not None
    payloads = ranks.gather_bytes(pack_rank(record, run.writer.states), "gathering the records and statistics")
    if r == 0:
        try:
            assert manifest is not None
            parts = [unpack_rank(p, [h.hook_id for h in stored]) for p in payloads]
            merged = merge_ranks(manifest, parts)
            manifest["rank_chunk_batches"] = settings["rank_chunk_batches"]
            finalize(out, manifest, stored, merged, run.documents_done)
        except BaseException as exc:
            error = exc
    ranks.agree(error, "writing the merged manifest")
    return open_if_here(out)


def rank_record_of(kit: ModelKit, stored: list[StoredHook], summary: CorpusSummary, settings: dict[str, Any], out: Path,
                 rank: int) -> dict[str, Any]:
    """This rank's commit record: resumed (same fingerprint, files past its last commit removed) or new."""
    path = out / rank_record(rank)
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("fingerprint") != fingerprint(settings):
            raise StoreError(f"{path} belongs to an extraction with other settings; give a new --out folder.")
        discard_uncommitted(out, record, rank=rank)
        return record
    for folder in (out / SHARDS_DIR, out / STATE_DIR, out / RANKS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
    discard_uncommitted(out, {"shards": [], "stats": {}}, rank=rank)  # what a run killed before its first commit left
    record = new_manifest(kit, stored, summary, settings)
    record.update(rank=rank, record=rank_record(rank))
    return record
