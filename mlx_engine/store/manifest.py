"""The manifest: what a store holds, how it was made, and which shards are committed.

manifest.json is the store's commit record. A shard belongs to the store when the
manifest lists it, so a file left by a run killed between writing a shard and updating
the manifest is removed on resume, never counted. The settings fingerprint (sha256 of
everything that decides the rows and statistics: checkpoint hash, tokenizer, hooks,
corpus hash, context and batch size, packing, dtype, limits) is how a re-run tells
"resume this" from "another run": only an equal fingerprint resumes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import Any, Optional

from .errors import StoreError, StoreMismatchError
from .shards import TMP_SUFFIX

FORMAT = {"name": "mlx-engine-activation-store", "version": 1}
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
SHARDS_DIR = "shards"
STATS_DIR = "stats"
STATE_DIR = "stats/state"
RANKS_DIR = "ranks"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt")


def sha256_files(files: list[Path]) -> str:
    """sha256 streamed over the files in order (each name, then its bytes)."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def checkpoint_files(path: Path) -> list[Path]:
    """config.json, then the weight files in name order."""
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return [path / "config.json", *weights]


def tokenizer_record(kit: Any) -> dict[str, Any]:
    """The tokenizer as the manifest names it: its files' hash and its special tokens."""
    files = [kit.path / name for name in TOKENIZER_FILES if (kit.path / name).exists()]
    tok = kit.tokenizer
    return {
        "sha256": sha256_files(files) if files else None,
        "files": [f.name for f in files],
        "vocab_size": len(tok.get_vocab()),
        "bos_token_id": getattr(tok, "bos_token_id", None),
        "eos_token_ids": sorted(kit.eos_token_ids),
        "pad_token_id": getattr(tok, "pad_token_id", None),
        "add_special_tokens": True,
    }


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in ("mlx-engine", "mlx", "mlx-lm", "numpy", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_manifest(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{out / MANIFEST} cannot be read ({exc}); this folder is not a usable activation store.") from None


def existing_manifest(out: Path, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The manifest of a store this run may resume; None when `out` is absent or empty.

    Refuses a folder that holds something else, or a store made with other settings
    (naming the settings that differ), before anything in it is touched.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise StoreError(f"--out {out} is a file; give a new folder (or a store to resume).")
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise StoreError(f"--out {out} is not empty and holds no activation store ({MANIFEST}); give a new folder.")
        return None
    manifest = read_manifest(out)
    if manifest.get("format", {}).get("name") != FORMAT["name"]:
        raise StoreError(f"{out / MANIFEST} is not an activation store manifest; give a new folder.")
    if manifest.get("fingerprint") != fingerprint(settings):
        old = manifest.get("settings", {})
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise StoreMismatchError(
            f"{out} holds an extraction with other settings (differing: {', '.join(differ) or 'format'}), so it cannot be "
            "resumed; give a new --out folder, or re-run with the settings recorded in its manifest.json."
        )
    return manifest


def discard_uncommitted(out: Path, manifest: dict[str, Any], rank: Optional[int] = None) -> None:
    """Remove what a killed run left beyond its last commit: temporary files, shards and
    states the manifest does not list, and document lines past the recorded length.

    With `rank` (a data-parallel job sharing the folder), only that rank's files are
    considered, and only rank 0 (the one that writes documents.jsonl) truncates it.
    """
    keep = {s["file"] for s in manifest["shards"]}
    state = manifest.get("stats", {}).get("state")
    prefix = "" if rank is None else f"rank{rank:04d}-"
    for folder in (out / SHARDS_DIR, out / STATE_DIR):
        for f in folder.iterdir() if folder.exists() else ():
            rel = str(f.relative_to(out))
            if rel not in keep and rel != state and f.name.startswith(prefix):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
    for f in out.rglob(f"{prefix}*{TMP_SUFFIX}"):
        f.unlink()
    if rank not in (None, 0):
        return
    shards = manifest["shards"]
    size = shards[-1]["documents_bytes"] if shards else 0
    docs = out / DOCUMENTS
    if docs.exists() and docs.stat().st_size != size:
        with open(docs, "r+b") as fh:
            fh.truncate(size)


def shard_name(rank: int, index: int) -> str:
    """Shard file names carry the rank, so ranks of a data-parallel run never collide."""
    return f"{SHARDS_DIR}/rank{rank:04d}-{index:06d}.safetensors"


def state_name(rank: int, shards: int) -> str:
    """The running statistics after `shards` shards of `rank`: a new name per commit, so the
    manifest always points at a state that matches its shard list."""
    return f"{STATE_DIR}/rank{rank:04d}-{shards:06d}.npz"


def rank_record(rank: int) -> str:
    """A rank's own commit record in a data-parallel job (its shards and statistics state)."""
    return f"{RANKS_DIR}/rank{rank:04d}.json"


def hook_file(hook_id: str) -> str:
    """A file-name-safe form of a hook id."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in hook_id)
