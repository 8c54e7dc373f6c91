"""`extract`: run a model over a corpus and write an activation store (layout: store/layout.md).

Everything that can be refused is checked before the output folder is touched: the
options, the hooks (resolved once with hooks.names.resolve_hooks, then checked for a
fixed row width), and the corpus (read through once, which also hashes it). The folder
must then be new, empty, or a store with the same settings fingerprint, which resumes
after its last committed shard: the batch stream is replayed without running the model
up to that point, the statistics are restored from the state saved with that shard, and
the uninterrupted and the resumed runs end with the same rows, documents and statistics.

`start_extraction` does all of that and returns an `Extraction` to step one batch at a
time (the HTTP server interleaves it with other requests; store/run.py runs the pass).
In a distributed job (world size > 1) `extract` runs `extract_ranks`: the same steps on
every rank, agreed between ranks, then the merge on rank 0 (store/ranks.py).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from ..hooks.names import HookRequest, resolve_hooks
from ..hooks.session import HookBusyError
from ..loading import ModelKit, load_model
from .corpus import Corpus, CorpusSummary
from .errors import StoreError, StoreWriteError
from .manifest import (
    DOCUMENTS, FORMAT, MANIFEST, RANKS_DIR, SHARDS_DIR, STATE_DIR, STATS_DIR, checkpoint_files, discard_uncommitted,
    existing_manifest, fingerprint, hook_file, rank_record, read_manifest, sha256_files, tokenizer_record, versions,
)
from .ranks import RANK_TIMEOUT_S, RankGroup, chunk_batches, merge_ranks, owner, pack_rank, unpack_rank
from .reader import ActivationStore
from .recorder import STORE_DTYPES, StoredHook, storable
from .run import ExtractionRun, now
from .shards import write_durably, write_json_durably
from .stats import NeuronStats, sparsity_row
from .writer import load_states

SHARD_BYTES = 256 << 20  # default shard size: large enough to read fast, small enough to lose little on a kill
STAT_DEFINITIONS = {
    "variance": "M2/n (population, numpy ddof=0)",
    "skewness": "sqrt(n)*M3/M2**1.5 (scipy.stats.skew, bias=True)",
    "kurtosis": "n*M4/M2**2 - 3 (scipy.stats.kurtosis, fisher=True, bias=True)",
    "frac_active": "fraction of tokens with x > threshold",
    "participation_ratio": "(sum |x|)**2 / (n * sum x**2) per neuron over its n tokens",
    "top": "k largest values per neuron with (doc, pos); ties to the earlier (doc, pos)",
}


def _check_options(context_size: int, batch_size: int, max_tokens: Optional[int], dtype: str, top_k: int, shard_tokens: Optional[int]) -> None:
    for name, value in (("context_size", context_size), ("batch_size", batch_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StoreError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in (("max_tokens", max_tokens), ("shard_tokens", shard_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise StoreError(f"{name} must be a positive integer (or omitted), got {value!r}.")
    if dtype not in STORE_DTYPES:
        raise StoreError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}.")


def _stored_hooks(kit: ModelKit, hooks: Iterable[HookRequest]) -> list[StoredHook]:
    requests = [hooks] if isinstance(hooks, (str, dict)) else list(hooks)
    if not requests:
        raise StoreError("Give at least one hook to store (e.g. 'layers.0.residual').")
    stored = storable(kit.arch_info, resolve_hooks(kit.arch_info, kit.native, requests))
    files = [hook_file(h.hook_id) for h in stored]
    if len(set(files)) != len(files):
        raise StoreError(f"Hook ids {[h.hook_id for h in stored]} collide as file names; give distinct hook_ids.")
    return stored


def _settings(kit: ModelKit, stored: list[StoredHook], summary: CorpusSummary, options: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides the rows and statistics (model by content, not by path)."""
    return {
        "format_version": FORMAT["version"],
        "checkpoint_sha256": sha256_files(checkpoint_files(kit.path)),
        "tokenizer_sha256": tokenizer_record(kit)["sha256"],
        "hooks": [h.to_json(options["dtype"]) for h in stored],
        "corpus_sha256": summary.sha256,
        "corpus_kind": summary.kind,
        "text_field": summary.text_field,
        **options,
    }


def _new_manifest(kit: ModelKit, stored: list[StoredHook], summary: CorpusSummary, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "status": "incomplete",
        "fingerprint": fingerprint(settings),
        "settings": settings,
        "model": {
            "id": kit.model_id, "path": str(kit.path), "model_type": kit.model_type, "native": kit.native,
            "checkpoint_sha256": settings["checkpoint_sha256"],
            "checkpoint_files": [f.name for f in checkpoint_files(kit.path)], "config": kit.config,
        },
        "tokenizer": tokenizer_record(kit),
        "hooks": [{**h.to_json(settings["dtype"]), "file": hook_file(h.hook_id), "shape": [0, h.width]} for h in stored],
        "context_size": settings["context_size"], "batch_size": settings["batch_size"],
        "packed": settings["packed"], "dtype": settings["dtype"],
        "corpus": summary.to_json(),
        "rank": 0, "world_size": settings.get("world_size", 1),
        "shards": [], "num_tokens": 0, "num_documents": 0,
        "stats": {"state": None, "top_k": settings["top_k"], "threshold": settings["active_threshold"], "definitions": STAT_DEFINITIONS},
        "timings": {"created": now(), "updated": now(), "runs": 0, "elapsed_seconds": 0.0,
                    "compute_seconds": 0.0, "stats_seconds": 0.0, "write_seconds": 0.0, "tokens_per_second": None},
        "versions": versions(),
    }


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
            _finalize(self.out, self.manifest, self.stored, self.run.writer.states, self.run.documents_done)
        return ActivationStore.open(self.out)

    def abort(self) -> None:
        if self.run is not None:
            self.run.abort()


def _prepare(kit: Union[ModelKit, str, Path], documents: Any, hooks: Iterable[HookRequest], options: dict[str, Any],
             text_field: str, ranks: RankGroup) -> tuple[ModelKit, list[StoredHook], Corpus, CorpusSummary, dict[str, Any]]:
    """Everything checked before the folder is touched: options, model, hooks, corpus; the settings."""
    _check_options(options["context_size"], options["batch_size"], options["max_tokens"], options["dtype"], options["top_k"],
                   options["shard_tokens"])
    if not isinstance(kit, ModelKit):
        kit = load_model(kit)
    stored = _stored_hooks(kit, hooks)
    corpus = Corpus(documents, text_field)
    summary = corpus.describe()
    row_bytes = sum(h.width for h in stored) * STORE_DTYPES[options["dtype"]].size + 16
    options["shard_tokens"] = options["shard_tokens"] or max(1, SHARD_BYTES // row_bytes)
    if ranks.distributed:
        if any(type(p).__module__.startswith("mlx_engine.distributed") for p in kit.hook_points.values()):
            raise StoreError("This model is split over the job's ranks (load_model(..., parallel=...)); data-parallel "
                             "extraction needs the whole model on every rank: load it without `parallel`.")
        options["world_size"] = ranks.size
        options["rank_chunk_batches"] = chunk_batches(options["shard_tokens"], options["batch_size"], options["context_size"])
    return kit, stored, corpus, summary, _settings(kit, stored, summary, options)


def _fresh_states(stored: list[StoredHook], manifest: dict[str, Any], out: Path, options: dict[str, Any]) -> dict[str, NeuronStats]:
    if manifest["stats"]["state"]:
        return load_states(out, manifest["stats"]["state"], {e["hook_id"]: e["file"] for e in manifest["hooks"]})
    return {h.hook_id: NeuronStats.empty(h.width, options["top_k"], options["active_threshold"]) for h in stored}


def start_extraction(
    kit: Union[ModelKit, str, Path], documents: Any, hooks: Iterable[HookRequest], out_dir: Union[str, Path], *,
    text_field: str = "text", progress: bool = False, queue_size: int = 4, **options: Any,
) -> Extraction:
    """Check everything, create or resume the store in `out_dir`, and return it ready to step (one process)."""
    kit, stored, corpus, summary, settings = _prepare(kit, documents, hooks, _options(**options), text_field, RankGroup(None, 0, 1))
    out = Path(out_dir).expanduser()
    manifest = existing_manifest(out, settings)
    if manifest is not None and manifest["status"] == "complete":
        return Extraction(out, manifest, stored, None)
    if manifest is None:
        manifest = _new_manifest(kit, stored, summary, settings)
        _create_store(out, manifest)
    else:
        discard_uncommitted(out, manifest)
    states = _fresh_states(stored, manifest, out, settings)
    run = ExtractionRun(kit, corpus, stored, out, manifest, states, settings, total_documents=summary.documents,
                        record=MANIFEST, progress=progress, queue_size=queue_size)
    return Extraction(out, manifest, stored, run)


def _options(context_size: int = 1024, batch_size: int = 8, max_tokens: Optional[int] = None, dtype: str = "float32",
             packed: bool = False, shard_tokens: Optional[int] = None, top_k: int = 20, active_threshold: float = 0.0) -> dict[str, Any]:
    return {"context_size": context_size, "batch_size": batch_size, "max_tokens": max_tokens, "dtype": dtype, "packed": bool(packed),
            "shard_tokens": shard_tokens, "top_k": top_k, "active_threshold": float(active_threshold)}


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
    """
    options = _options(context_size, batch_size, max_tokens, dtype, packed, shard_tokens, top_k, active_threshold)
    if isinstance(rank_timeout_s, bool) or not isinstance(rank_timeout_s, (int, float)) or not 0 < rank_timeout_s < float("inf"):
        raise StoreError(f"rank_timeout_s must be a positive number of seconds, got {rank_timeout_s!r}.")
    ranks = RankGroup.current()
    if ranks.distributed:
        runs: list[ExtractionRun] = []  # the settle step of a timeout: stop the writer, its commit in progress done
        ranks = ranks.bounded(rank_timeout_s, settle=lambda: [run.abort() for run in runs])
        try:
            return extract_ranks(kit, documents, hooks, out_dir, options, text_field, ranks, progress, queue_size, runs)
        finally:
            ranks.close()
    job = start_extraction(kit, documents, hooks, out_dir, text_field=text_field, progress=progress, queue_size=queue_size, **options)
    if job.run is not None:
        job.run.run_to_end()
    return job.finish()


def _create_store(out: Path, manifest: dict[str, Any]) -> None:
    """The empty store, manifest last; on a write error, nothing of it is left behind."""
    existed = out.exists()
    try:
        for folder in (out, out / SHARDS_DIR, out / STATE_DIR, *((out / RANKS_DIR,) if manifest["world_size"] > 1 else ())):
            folder.mkdir(parents=True, exist_ok=True)
        (out / DOCUMENTS).touch()
        write_json_durably(out / MANIFEST, manifest)
    except OSError as exc:
        for child in (out / MANIFEST, out / DOCUMENTS, out / STATE_DIR, out / STATS_DIR, out / SHARDS_DIR, out / RANKS_DIR):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise StoreWriteError(f"Cannot create the activation store in {out}: {exc}.") from exc


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
        kit, stored, corpus, summary, settings = _prepare(kit, documents, hooks, options, text_field, ranks)
    except BaseException as exc:
        error = exc
    ranks.agree(error, "checking the input")
    manifest, complete = None, 0
    if r == 0:  # rank 0 alone decides about the folder (it may be shared with the others)
        try:
            manifest = existing_manifest(out, settings)
            if manifest is None:
                manifest = _new_manifest(kit, stored, summary, settings)
                _create_store(out, manifest)
            complete = int(manifest["status"] == "complete")
        except BaseException as exc:
            error = exc
    status = ranks.exchange([int(error is not None), complete], "opening the store folder")
    if error is not None:
        raise error
    if status[0, 0]:
        raise StoreError(f"Rank 0 of the data-parallel job refused the store folder {out}; its log says why.")
    if status[0, 1]:
        return _open_if_here(out)
    run: Optional[ExtractionRun] = None
    try:
        record = _rank_record(kit, stored, summary, settings, out, r)
        states = _fresh_states(stored, record, out, settings)
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
            _finalize(out, manifest, stored, merged, run.documents_done)
        except BaseException as exc:
            error = exc
    ranks.agree(error, "writing the merged manifest")
    return _open_if_here(out)


def _open_if_here(out: Path) -> Optional[ActivationStore]:
    """The merged store, where this rank sees it whole (a shared folder, or rank 0 once the shards are copied in)."""
    if not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out)
    if manifest["status"] != "complete" or not all((out / s["file"]).exists() for s in manifest["shards"]):
        return None
    return ActivationStore.open(out)


def _rank_record(kit: ModelKit, stored: list[StoredHook], summary: CorpusSummary, settings: dict[str, Any], out: Path,
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
    record = _new_manifest(kit, stored, summary, settings)
    record.update(rank=rank, record=rank_record(rank))
    return record


def _finalize(out: Path, manifest: dict[str, Any], stored: list[StoredHook], states: dict[str, NeuronStats], documents: int) -> None:
    """Per-hook statistics files, stats.json and sparsity.csv, then the manifest marked complete."""
    summary: dict[str, Any] = {}
    rows = []
    for h, entry in zip(stored, manifest["hooks"]):
        state = states[h.hook_id]
        buffer = io.BytesIO()
        np.savez(buffer, **state.summary_arrays())
        write_durably(out / STATS_DIR / f"{entry['file']}.npz", buffer.getvalue())
        entry["shape"] = [manifest["num_tokens"], h.width]
        row = sparsity_row(h.hook_id, h.hook.layer, h.hook.component.value, state)
        rows.append(row)
        summary[h.hook_id] = {"file": f"{STATS_DIR}/{entry['file']}.npz", **{k: v for k, v in row.items() if k != "hook_id"}}
    write_durably(out / STATS_DIR / "stats.json", (json.dumps(summary, indent=2) + "\n").encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_durably(out / "sparsity.csv", text.getvalue().encode())
    manifest["num_documents"] = documents
    manifest["documents"] = {"file": DOCUMENTS, "count": documents, "bytes": (out / DOCUMENTS).stat().st_size}
    manifest["stats"]["files"] = {h.hook_id: f"{STATS_DIR}/{e['file']}.npz" for h, e in zip(stored, manifest["hooks"])}
    manifest["status"] = "complete"
    manifest["timings"]["updated"] = now()
    write_json_durably(out / MANIFEST, manifest)
