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
import mmap
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

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
    """Every tensor of a shard as a read-only array over one memory map of the file (bfloat16 as its uint16 bits).

    One map per file, not one `np.memmap` per tensor: each map holds a file descriptor, and
    a store of hundreds of shards and a dozen hooks would run out of them (macOS allows 256
    per process by default).
    """
    header, start = read_header(path)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
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
            out[name] = np.ndarray(shape, dtype, buffer=mapped, offset=start + begin)
    return out


class ShardMaps:
    """The shards' tensors, each file mapped when first read; at most `keep` files held here.

    A shard evicted from the cache stays mapped while an array of it is referenced
    elsewhere, and is unmapped (its descriptor closed) once none is, so a pass over every
    shard of a large store holds a bounded number of descriptors.
    """

    KEEP = 64  # files held at once: well under the 256 descriptors macOS gives a process by default

    def __init__(self, files: list[Path], keep: Optional[int] = None) -> None:
        self.files, self.keep = files, keep if keep is not None else self.KEEP
        self._open: "OrderedDict[int, dict[str, np.ndarray]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self.files) <= i < len(self.files):
            raise IndexError(f"shard {i} out of range for {len(self.files)} shards")
        i %= len(self.files)
        if i in self._open:
            self._open.move_to_end(i)
        else:
            self._open[i] = memmap_tensors(self.files[i])
            while len(self._open) > self.keep:
                self._open.popitem(last=False)
        return self._open[i]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(len(self.files)))


class ShardTensor:
    """One tensor of every shard as a sequence of arrays (`[i]` maps shard i when read), with known lengths."""

    def __init__(self, maps: ShardMaps, name: str, rows: list[int]) -> None:
        self.maps, self.name, self.rows = maps, name, rows

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.maps[i][self.name]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32: the same value, exactly (bfloat16 is float32's top half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def as_float(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as a float array numpy can compute with (bfloat16 widened to float32)."""
    return bfloat16_to_float32(array) if dtype == "bfloat16" else np.asarray(array)
