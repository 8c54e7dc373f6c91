"""What every extraction does before and after its pass: check, set up the folder, finish it.

Everything that can be refused is checked before the output folder is touched: the
options, the hooks (resolved once with hooks.names.resolve_hooks, then checked for a
fixed row width), and the corpus (read through once, which also hashes it). The
settings (everything that decides the rows, the model by content) are the store's
fingerprint: a folder holding a store with other settings is refused, one with the
same settings resumed. `finalize` writes the statistics and marks the store complete.
Shared by the one-process run (extract.py), the data-parallel ranks (data_parallel.py)
and the model-parallel ranks (model_parallel.py).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from ..distributed.pipeline import PipelineHookPoint
from ..distributed.sites import ShardedHookPoint
from ..hooks.names import HookRequest, resolve_hooks
from ..loading import ModelKit, load_model
from .corpus import Corpus, CorpusSummary
from .errors import StoreError, StoreWriteError
from .manifest import (
    DOCUMENTS,
    FORMAT,
    MANIFEST,
    RANKS_DIR,
    SHARDS_DIR,
    STATE_DIR,
    STATS_DIR,
    checkpoint_files,
    discard_uncommitted,
    existing_manifest,
    fingerprint,
    hook_file,
    read_manifest,
    sha256_files,
    tokenizer_record,
    versions,
)
from .ranks import RankGroup, chunk_batches
from .reader import ActivationStore
from .recorder import STORE_DTYPES, StoredHook, storable
from .run import now
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



def options_of(context_size: int = 1024, batch_size: int = 8, max_tokens: Optional[int] = None, dtype: str = "float32",
             packed: bool = False, shard_tokens: Optional[int] = None, top_k: int = 20, active_threshold: float = 0.0) -> dict[str, Any]:
    return {"context_size": context_size, "batch_size": batch_size, "max_tokens": max_tokens, "dtype": dtype, "packed": bool(packed),
            "shard_tokens": shard_tokens, "top_k": top_k, "active_threshold": float(active_threshold)}



def check_options(context_size: int, batch_size: int, max_tokens: Optional[int], dtype: str, top_k: int, shard_tokens: Optional[int]) -> None:
    for name, value in (("context_size", context_size), ("batch_size", batch_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StoreError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in (("max_tokens", max_tokens), ("shard_tokens", shard_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise StoreError(f"{name} must be a positive integer (or omitted), got {value!r}.")
    if dtype not in STORE_DTYPES:
        raise StoreError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}.")



def stored_hooks(kit: ModelKit, hooks: Iterable[HookRequest]) -> list[StoredHook]:
    requests = [hooks] if isinstance(hooks, (str, dict)) else list(hooks)
    if not requests:
        raise StoreError("Give at least one hook to store (e.g. 'layers.0.residual').")
    stored = storable(kit.arch_info, resolve_hooks(kit.arch_info, kit.native, requests))
    files = [hook_file(h.hook_id) for h in stored]
    if len(set(files)) != len(files):
        raise StoreError(f"Hook ids {[h.hook_id for h in stored]} collide as file names; give distinct hook_ids.")
    return stored



def split_mode(kit: ModelKit) -> Optional[str]:
    """'tensor' or 'pipeline' for a model split over the job's ranks (load_model(..., parallel=...)), else None."""
    for point in kit.hook_points.values():
        if isinstance(point, ShardedHookPoint):
            return "tensor"
        if isinstance(point, PipelineHookPoint):
            return "pipeline"
    return None



def settings_of(kit: ModelKit, stored: list[StoredHook], summary: CorpusSummary, options: dict[str, Any]) -> dict[str, Any]:
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



def new_manifest(kit: ModelKit, stored: list[StoredHook], summary: CorpusSummary, settings: dict[str, Any]) -> dict[str, Any]:
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



def prepare(kit: Union[ModelKit, str, Path], documents: Any, hooks: Iterable[HookRequest], options: dict[str, Any],
            text_field: str, ranks: RankGroup, parallel: Optional[str] = None,
            ) -> tuple[ModelKit, list[StoredHook], Corpus, CorpusSummary, dict[str, Any]]:
    """Everything checked before the folder is touched: options, model, hooks, corpus; the settings.

    A model split over the job's ranks (loaded here with `parallel`, or a ModelKit loaded
    so) makes a model-parallel extraction: its mode and world size join the settings.
    Otherwise a job of several ranks is data-parallel: its chunking joins them.
    """
    check_options(options["context_size"], options["batch_size"], options["max_tokens"], options["dtype"], options["top_k"],
                  options["shard_tokens"])
    if not isinstance(kit, ModelKit):
        kit = load_model(kit, parallel=parallel)
    mode = split_mode(kit)
    if parallel is not None and ranks.distributed and mode != parallel:
        raise StoreError(f"parallel={parallel!r} asks for a model split over the job's ranks, but the ModelKit given is "
                         f"{f'split for {mode!r}' if mode else 'whole'}: pass the model's path, or load it with "
                         f"load_model(..., parallel={parallel!r}).")
    stored = stored_hooks(kit, hooks)
    corpus = Corpus(documents, text_field)
    summary = corpus.describe()
    row_bytes = sum(h.width for h in stored) * STORE_DTYPES[options["dtype"]].size + 16
    options["shard_tokens"] = options["shard_tokens"] or max(1, SHARD_BYTES // row_bytes)
    if mode is not None:
        options["model_parallel"] = {"mode": mode, "world_size": ranks.size}
    elif ranks.distributed:
        options["world_size"] = ranks.size
        options["rank_chunk_batches"] = chunk_batches(options["shard_tokens"], options["batch_size"], options["context_size"])
    return kit, stored, corpus, summary, settings_of(kit, stored, summary, options)



def open_store(out: Path, kit: ModelKit, stored: list[StoredHook], summary: CorpusSummary,
               settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the one writer's store in `out`: new (the folder created), resumed (files past its
    last commit removed), or complete as it is; a store with other settings is refused (existing_manifest)."""
    manifest = existing_manifest(out, settings)
    if manifest is None:
        manifest = new_manifest(kit, stored, summary, settings)
        create_store(out, manifest)
    elif manifest["status"] != "complete":
        discard_uncommitted(out, manifest)
    return manifest


def fresh_states(stored: list[StoredHook], manifest: dict[str, Any], out: Path, options: dict[str, Any]) -> dict[str, NeuronStats]:
    if manifest["stats"]["state"]:
        return load_states(out, manifest["stats"]["state"], {e["hook_id"]: e["file"] for e in manifest["hooks"]})
    return {h.hook_id: NeuronStats.empty(h.width, options["top_k"], options["active_threshold"]) for h in stored}



def create_store(out: Path, manifest: dict[str, Any]) -> None:
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



def finalize(out: Path, manifest: dict[str, Any], stored: list[StoredHook], states: dict[str, NeuronStats], documents: int) -> None:
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



def open_if_here(out: Path) -> Optional[ActivationStore]:
    """The merged store, where this rank sees it whole (a shared folder, or rank 0 once the shards are copied in)."""
    if not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out)
    if manifest["status"] != "complete" or not all((out / s["file"]).exists() for s in manifest["shards"]):
        return None
    return ActivationStore.open(out)

