"""Whole captures as safetensors files, written and read by MLX (bfloat16 survives exactly).

Each tensor's wire metadata sits in the header as a JSON string, so a file names its
own hooks, steps and positions without this package.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any, Optional

import mlx.core as mx

from ..hooks.capture import Capture
from .codec import EncodingError

# Header key holding the caller's own metadata in a safetensors file.
SAFETENSORS_USER_METADATA_KEY = "user_metadata"


# Step and chunk numbers are zero-padded so that the names sort in step order (a reader listing
# the file sees step 2 before step 10); widths hold 10^6 steps and 10^4 prefill chunks. Older files
# wrote them unpadded (`step2/chunk0`); parse_tensor_key reads both.
STEP_DIGITS = 6
CHUNK_DIGITS = 4
_KEY = re.compile(r"^(?P<hook>.+)/step(?P<step>\d+)/chunk(?P<chunk>\d+)(?:/(?P<extra>[^/]+))?$")


def _tensor_key(hook_id: str, step: int, chunk: int) -> str:
    return f"{hook_id}/step{step:0{STEP_DIGITS}d}/chunk{chunk:0{CHUNK_DIGITS}d}"


def parse_tensor_key(name: str) -> Optional[tuple[str, int, int, Optional[str]]]:
    """(hook id, step, chunk, companion name or None) of a tensor name, padded or not; None if not one."""
    match = _KEY.match(name)
    if match is None:
        return None
    return match["hook"], int(match["step"]), int(match["chunk"]), match["extra"]


def captures_to_safetensors(
    captures_by_hook: Mapping[str, list[Capture]],
    metadata: Optional[Mapping[str, Any]] = None,
) -> bytes:
    """One safetensors file holding every capture, one tensor per hook, step and chunk.

    Tensor `{hook_id}/step{step:06d}/chunk{i:04d}` is the i-th capture of that hook in that
    step (the prompt may be prefilled in several chunks), so names sort in step order; a
    companion is stored beside it as `.../chunk{i:04d}/{name}`. The header maps each main tensor's name to its wire metadata
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
        parsed = parse_tensor_key(key)
        if parsed is None or parsed[3] is not None:
            raise EncodingError(f"header key {key!r} is not a capture tensor name ({{hook_id}}/step{{n}}/chunk{{i}})")
        chunk = parsed[2]
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
