"""`extract`: run a model over a corpus and write an activation store (layout: store/layout.md).

Everything that can be refused is checked before the output folder is touched: the
options, the hooks (resolved once with hooks.names.resolve_hooks, then checked for a
fixed row width), and the corpus (read through once, which also hashes it). The folder
must then be new, empty, or a store with the same settings fingerprint, which resumes
after its last committed shard: the batch stream is replayed without running the model
up to that point, the statistics are restored from the state saved with that shard, and
the uninterrupted and the resumed runs end with the same rows, documents and statistics.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from ..hooks.names import HookRequest, resolve_hooks
from ..loading import ModelKit, load_model, tokenize
from .corpus import Corpus, CorpusSummary
from .errors import StoreError, StoreWriteError
from .manifest import (
    DOCUMENTS, FORMAT, MANIFEST, SHARDS_DIR, STATE_DIR, STATS_DIR, checkpoint_files, discard_uncommitted,
    existing_manifest, fingerprint, hook_file, sha256_files, tokenizer_record, versions,
)
from .plan import plan_batches
from .reader import ActivationStore
from .recorder import STORE_DTYPES, BatchRecorder, StoredHook, storable
from .shards import write_durably, write_json_durably
from .stats import NeuronStats, sparsity_row
from .writer import BatchRows, StoreWriter, load_states

SHARD_BYTES = 256 << 20  # default shard size: large enough to read fast, small enough to lose little on a kill
STAT_DEFINITIONS = {
    "variance": "M2/n (population, numpy ddof=0)",
    "skewness": "sqrt(n)*M3/M2**1.5 (scipy.stats.skew, bias=True)",
    "kurtosis": "n*M4/M2**2 - 3 (scipy.stats.kurtosis, fisher=True, bias=True)",
    "frac_active": "fraction of tokens with x > threshold",
    "participation_ratio": "(sum |x|)**2 / (n * sum x**2) per neuron over its n tokens",
    "top": "k largest values per neuron with (doc, pos); ties to the earlier (doc, pos)",
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        "rank": 0, "world_size": 1,
        "shards": [], "num_tokens": 0, "num_documents": 0,
        "stats": {"state": None, "top_k": settings["top_k"], "threshold": settings["active_threshold"], "definitions": STAT_DEFINITIONS},
        "timings": {"created": _now(), "updated": _now(), "runs": 0, "elapsed_seconds": 0.0,
                    "compute_seconds": 0.0, "stats_seconds": 0.0, "write_seconds": 0.0, "tokens_per_second": None},
        "versions": versions(),
    }


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
) -> ActivationStore:
    """Write every row of `hooks` over `documents` to the store `out_dir` and return it, opened.

    `documents`: a path (see store/corpus.py for the formats), a list of strings or of
    dicts with `text_field`, or a datasets.Dataset. Documents longer than `context_size`
    tokens are cut into windows; `packed` packs documents into full windows instead
    (rows then differ from per-document runs). `shard_tokens` rows per shard (default:
    about 256 MiB per shard). An existing store with the same settings is resumed (or,
    if complete, returned at once); one with other settings is refused.
    """
    _check_options(context_size, batch_size, max_tokens, dtype, top_k, shard_tokens)
    if not isinstance(kit, ModelKit):
        kit = load_model(kit)
    stored = _stored_hooks(kit, hooks)
    corpus = Corpus(documents, text_field)
    summary = corpus.describe()
    itemsize = STORE_DTYPES[dtype].size
    row_bytes = sum(h.width for h in stored) * itemsize + 16
    options = {
        "context_size": context_size, "batch_size": batch_size, "max_tokens": max_tokens, "dtype": dtype, "packed": bool(packed),
        "shard_tokens": shard_tokens or max(1, SHARD_BYTES // row_bytes), "top_k": top_k, "active_threshold": float(active_threshold),
    }
    settings = _settings(kit, stored, summary, options)
    out = Path(out_dir).expanduser()
    manifest = existing_manifest(out, settings)
    if manifest is not None and manifest["status"] == "complete":
        return ActivationStore.open(out)
    if manifest is None:
        manifest = _new_manifest(kit, stored, summary, settings)
        _create_store(out, manifest)
    else:
        discard_uncommitted(out, manifest)
    states = {h.hook_id: NeuronStats.empty(h.width, top_k, float(active_threshold)) for h in stored}
    if manifest["stats"]["state"]:
        states = load_states(out, manifest["stats"]["state"], {e["hook_id"]: e["file"] for e in manifest["hooks"]})
    documents_done = _run(kit, corpus, stored, out, manifest, states, options, summary, progress, queue_size)
    _finalize(out, manifest, stored, states, documents_done)
    return ActivationStore.open(out)


def _create_store(out: Path, manifest: dict[str, Any]) -> None:
    """The empty store, manifest last; on a write error, nothing of it is left behind."""
    existed = out.exists()
    try:
        for folder in (out, out / SHARDS_DIR, out / STATE_DIR):
            folder.mkdir(parents=True, exist_ok=True)
        (out / DOCUMENTS).touch()
        write_json_durably(out / MANIFEST, manifest)
    except OSError as exc:
        for child in (out / MANIFEST, out / DOCUMENTS, out / STATE_DIR, out / STATS_DIR, out / SHARDS_DIR):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise StoreWriteError(f"Cannot create the activation store in {out}: {exc}.") from exc


def _run(
    kit: ModelKit, corpus: Corpus, stored: list[StoredHook], out: Path, manifest: dict[str, Any],
    states: dict[str, NeuronStats], options: dict[str, Any], summary: CorpusSummary, progress: bool, queue_size: int,
) -> int:
    """The pass itself: forwards on this thread, the writer thread behind a bounded queue."""
    from tqdm import tqdm

    shards = manifest["shards"]
    skip = shards[-1]["batches_end"] if shards else 0
    documents_done = shards[-1]["documents_end"] if shards else 0
    timings = manifest["timings"]
    timings["runs"] += 1
    base = {k: timings[k] for k in ("elapsed_seconds", "compute_seconds", "stats_seconds", "write_seconds")}
    started, compute = time.perf_counter(), [0.0]
    pad = getattr(kit.tokenizer, "pad_token_id", None)
    recorder = BatchRecorder(kit.hook_points, stored, options["dtype"], pad if isinstance(pad, int) else 0)
    storage = np.uint16 if options["dtype"] == "bfloat16" else np.dtype(options["dtype"])
    writer: StoreWriter

    def on_commit(m: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - started
        t = m["timings"]
        t["updated"] = _now()
        t["elapsed_seconds"] = base["elapsed_seconds"] + elapsed
        t["compute_seconds"] = base["compute_seconds"] + compute[0]
        t["stats_seconds"] = base["stats_seconds"] + writer.stats_seconds
        t["write_seconds"] = base["write_seconds"] + writer.write_seconds
        t["tokens_per_second"] = m["num_tokens"] / t["elapsed_seconds"] if t["elapsed_seconds"] else None
        m["num_documents"] = writer.documents_written

    recorder.arm()  # first: a model busy with another session is refused before any file is opened
    try:
        writer = StoreWriter(out, manifest, stored, states, dtype=options["dtype"], shard_rows=options["shard_tokens"],
                             queue_size=queue_size, on_commit=on_commit)
    except BaseException:
        recorder.disarm()
        raise
    bar = tqdm(total=summary.documents, initial=documents_done, unit="doc", disable=not progress, file=sys.stderr,
               desc=f"extract -> {out.name}", dynamic_ncols=True)
    tokens_done, run_tokens = manifest["num_tokens"], 0
    plan = plan_batches(corpus, lambda text: tokenize(kit, text), context_size=options["context_size"],
                        batch_size=options["batch_size"], packed=options["packed"], max_tokens=options["max_tokens"])
    try:
        writer.start()
        for batch in plan:
            if batch.index < skip:
                continue
            t0 = time.perf_counter()
            if batch.windows:
                rows = recorder.run(kit.model, [w.tokens for w in batch.windows])
            else:
                rows = {h.hook_id: np.empty((0, h.width), storage) for h in stored}
            compute[0] += time.perf_counter() - t0
            index = [np.concatenate([getattr(w, f) for w in batch.windows]) if batch.windows else np.empty(0, dt)
                     for f, dt in (("tokens", np.int32), ("doc", np.int64), ("pos", np.int32))]
            writer.put(BatchRows(batch.index, rows, *index, batch.documents))
            documents_done += len(batch.documents)
            run_tokens += batch.rows
            bar.update(len(batch.documents))
            rate = run_tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix_str(f"{tokens_done + run_tokens:,} tok, {rate:,.0f} tok/s", refresh=False)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        recorder.disarm()
        bar.close()
    on_commit(manifest)
    return documents_done


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
    manifest["timings"]["updated"] = _now()
    write_json_durably(out / MANIFEST, manifest)
