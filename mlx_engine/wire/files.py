"""Whole captures as safetensors files, written and read by MLX (bfloat16 survives exactly).

Each tensor's wire metadata sits in the header as a JSON string, so a file names its
own hooks, steps and positions without this package.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any, Optional

import mlx.core as mx

from ..hooks.capture import Capture
from .codec import EncodingError

# Header key holding the caller's own metadata in a safetensors file.
SAFETENSORS_USER_METADATA_KEY = "user_metadata"


def _tensor_key(hook_id: str, step: int, chunk: int) -> str:
    return f"{hook_id}/step{step}/chunk{chunk}"


def captures_to_safetensors(
    captures_by_hook: Mapping[str, list[Capture]],
    metadata: Optional[Mapping[str, Any]] = None,
) -> bytes:
    """One safetensors file holding every capture, one tensor per hook, step and chunk.

    Tensor `{hook_id}/step{step}/chunk{i}` is the i-th capture of that hook in that step
    (the prompt may be prefilled in several chunks); a companion is stored beside it as
    `.../chunk{i}/{name}`. The header maps each main tensor's name to its wire metadata
    as a JSON string, and `user_metadata` to the caller's `metadata` as a JSON string.
    MLX writes the file, so bfloat16 is stored as BF16 without conversion.
    """
    arrays: dict[str, mx.array] = {}
    header: dict[str, str] = {}
    for hook_id, captures in captures_by_hook.items():
        chunks: dict[int, int] = {}
        for capture in captures:
            if capture.hook_id != hook_id:
                raise EncodingError(
                    f"capture of {capture.hook_id!r} listed under hook {hook_id!r}"
                )
            chunk = chunks.get(capture.step, 0)
            chunks[capture.step] = chunk + 1
            key = _tensor_key(hook_id, capture.step, chunk)
            arrays[key] = capture.array
            meta = capture.metadata()
            meta["extras"] = sorted(capture.extras)
            for name, extra in capture.extras.items():
                arrays[f"{key}/{name}"] = extra
            header[key] = json.dumps(meta)
    header[SAFETENSORS_USER_METADATA_KEY] = json.dumps(dict(metadata or {}))
    buffer = io.BytesIO()
    mx.save_safetensors(buffer, arrays, metadata=header)
    return buffer.getvalue()


def safetensors_to_captures(
    blob: bytes,
) -> tuple[dict[str, list[Capture]], dict[str, Any]]:
    """Read back `captures_to_safetensors`: captures by hook (step order) and the caller's metadata."""
    arrays, header = mx.load(io.BytesIO(blob), format="safetensors", return_metadata=True)
    user = json.loads(header.pop(SAFETENSORS_USER_METADATA_KEY, "{}"))
    captures: dict[str, list[tuple[int, int, Capture]]] = {}
    for key, text in header.items():
        meta = json.loads(text)
        if key not in arrays:
            raise EncodingError(f"header describes {key!r} but the file has no such tensor")
        chunk = int(key.rsplit("/chunk", 1)[1])
        capture = Capture(
            hook_id=meta["hook_id"],
            layer_name=meta["layer_name"],
            layer=meta["layer"],
            component=meta["component"],
            step=meta["step"],
            positions=tuple(meta["positions"]),
            is_input=meta["is_input"],
            array=arrays[key],
            key_positions=meta.get("key_positions"),
            extras={name: arrays[f"{key}/{name}"] for name in meta.get("extras", [])},
            edit=meta.get("edit"),
        )
        captures.setdefault(capture.hook_id, []).append((capture.step, chunk, capture))
    ordered = {
        hook: [c for _, _, c in sorted(items, key=lambda t: (t[0], t[1]))]
        for hook, items in captures.items()
    }
    return ordered, user
