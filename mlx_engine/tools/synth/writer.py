"""Streaming safetensors shards: headers first, then tensor bytes chunk by chunk.

A safetensors file is an 8-byte header length, a JSON header giving every tensor's
dtype, shape and byte range, then the raw data. Since a synthetic tensor's shape and
dtype are known before any of its values exist, the header can be written up front and
the data streamed behind it, so no tensor (let alone a 60 GB model) is ever whole in
memory. This module knows only the file format, not what the bytes are; it needs
neither numpy nor MLX.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_SHARD_BYTES = 2 * 1024**3
"""Largest shard written by default: 2 GiB, the size Hugging Face checkpoints use."""

DTYPE_BYTES: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
"""Bytes per element of each safetensors dtype code that synth writes."""

FLOAT_DTYPES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
"""The float dtypes a checkpoint may be written in (MLX names), and their safetensors codes."""

Entry = tuple[str, str, tuple[int, ...]]
"""One tensor in a shard: name, safetensors dtype code, shape."""


def _entry_bytes(entry: Entry) -> int:
    return math.prod(entry[2]) * DTYPE_BYTES[entry[1]]


class SafetensorsShardWriter:
    """Writes tensors into safetensors shards whose headers are known before any data.

    Each shard's header (names, dtypes, shapes, offsets) is written first; tensors then
    arrive in header order as byte chunks, so no tensor is ever whole in memory.
    """

    def __init__(self, out_dir: Path, entries: list[Entry], shard_bytes: int) -> None:
        """Split `entries`, in order, into shards of at most `shard_bytes` each (a single
        tensor larger than that gets a shard of its own)."""
        self.out_dir = out_dir
        self.shards: list[list[Entry]] = [[]]
        size = 0
        for entry in entries:
            nbytes = _entry_bytes(entry)
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(entry)
            size += nbytes
        n = len(self.shards)
        self.names = [
            "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self.total_bytes = 0

    def write(self, chunks_for: Callable[[str], Iterator[bytes]]) -> dict[str, str]:
        """Write every shard; returns the weight map (tensor name -> shard file).

        `chunks_for(name)` must yield exactly the tensor's byte count; a mismatch raises,
        since it would shift every later tensor's offset and corrupt the file silently.
        Several shards also get the `model.safetensors.index.json` loaders look for.
        """
        weight_map = {}
        for fname, shard in zip(self.names, self.shards):
            header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
            offset = 0
            for name, dtype, shape in shard:
                nbytes = _entry_bytes((name, dtype, shape))
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the format asks for 8-byte aligned data
            with open(self.out_dir / fname, "wb") as fh:
                fh.write(struct.pack("<Q", len(blob)))
                fh.write(blob)
                for name, dtype, shape in shard:
                    expected = _entry_bytes((name, dtype, shape))
                    written = 0
                    for chunk in chunks_for(name):
                        fh.write(chunk)
                        written += len(chunk)
                    if written != expected:
                        raise RuntimeError(f"{name}: wrote {written} bytes, expected {expected}.")
                    weight_map[name] = fname
            self.total_bytes += offset
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map
