"""Shard files: safetensors written with numpy alone, durably, and read back memory-mapped.

Why safetensors: the format is an 8-byte header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw little-endian bytes. Any language can
read it (the `safetensors` library, MLX, PyTorch, or `np.memmap` at the header's
offsets); a reader maps only the pages it touches, so a store far larger than memory
is read row by row; and there is no code in it to execute (unlike pickle). Tensors are
written widest item first and the header is padded to 8 bytes, so every tensor starts
aligned for its dtype and maps without a copy.

Durability: a file is written under a temporary name, fsynced, renamed into place, and
its folder fsynced, so a shard name that exists is a whole shard; the manifest, updated
after the rename, is what says a shard belongs to the store.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

# safetensors dtype codes <-> numpy; bfloat16 has no numpy dtype: its uint16 bit patterns are stored.
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32", "uint32": "U32"}
NUMPY_OF_CODE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U32": np.uint32}
TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary name, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_durably(path: Path, obj: Any) -> None:
    write_durably(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_shard(path: Path, tensors: Mapping[str, tuple[np.ndarray, str]], metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write tensors {name: (array, dtype name)} as one safetensors file; returns its size in bytes.

    bfloat16 arrays are given as their uint16 bit patterns with dtype name "bfloat16".
    """
    items = sorted(tensors.items(), key=lambda kv: -kv[1][0].dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, (array, dtype) in items:
        nbytes = array.nbytes
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % 8)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for _, (array, _) in items:
                fh.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return 8 + len(blob) + offset


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the byte offset where its tensor data begins."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return header, 8 + length


def memmap_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a shard as a read-only np.memmap (bfloat16 as its uint16 bits)."""
    header, start = read_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(NUMPY_OF_CODE[info["dtype"]]).newbyteorder("<")
        shape = tuple(info["shape"])
        if end == begin:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32: the same value, exactly (bfloat16 is float32's top half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def as_float(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as a float array numpy can compute with (bfloat16 widened to float32)."""
    return bfloat16_to_float32(array) if dtype == "bfloat16" else np.asarray(array)
