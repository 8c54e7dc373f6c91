"""Activation wire formats: how a capture travels over HTTP (numpy only).

A capture on the wire is one JSON object: the metadata fields of `wire/fields.py` plus
`encoding` and `data` (docs/architecture.md, "Wire formats"). Three encodings:

- ``json``: `data` is nested lists of numbers in the array's shape. Every float is
  written as the shortest decimal that round-trips the value *as a float64*, and every
  float32/float16/bfloat16 value is exactly a float64, so any JSON parser that reads
  numbers as doubles (Python, JavaScript, Smalltalk's JSON packages) recovers the
  stored value bit for bit after a cast back to the stated dtype. A float32-shortest
  repr would be shorter but forces a decimal -> double -> float double rounding that
  is not exact in every case. JSON has no literal for infinities or NaN
  (`attention_scores` holds -inf at masked positions), so those are written as the
  strings ``"-Infinity"``, ``"Infinity"`` and ``"NaN"``: the spellings JavaScript's
  `String(x)` produces and Python's `float()` and `Number()` both parse.
- ``base64``: `data` is the base64 of the raw little-endian, row-major bytes of the
  array in its stated dtype; bfloat16 travels as its 16-bit pattern.
- ``none``: `data` is null; the metadata alone tells what was captured.

Router captures also carry companions (`experts`, `weights`). Each travels under its
own key as ``{"shape", "dtype", "data"}``, encoded like the main tensor.

Decoding gives numpy arrays. numpy has no bfloat16, and pulling in `ml_dtypes` for a
type most consumers immediately upcast is not worth a dependency, so bfloat16 decodes
to float32: exact, since every bfloat16 is a float32 whose low 16 bits are zero.

This module imports numpy alone: the HTTP clients decode with it and never load MLX.
The engine hands the encoder numpy views of its arrays (`Capture.wire_arrays()`).
Whole captures as safetensors files are `wire/files.py`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Optional, Protocol

import numpy as np

FORMATS: tuple[str, ...] = ("json", "base64", "none")

# Strings that stand for the float values JSON cannot spell.
NONFINITE_STRINGS: dict[str, float] = {
    "Infinity": float("inf"),
    "-Infinity": float("-inf"),
    "NaN": float("nan"),
}



class WireCapture(Protocol):
    """What the encoder needs of a capture (the engine's `Capture` is one)."""

    def metadata(self) -> dict[str, Any]: ...

    def wire_arrays(self) -> dict[str, tuple[np.ndarray, str]]: ...


class EncodingError(ValueError):
    """An unknown format, an unsupported dtype, or data that does not match its shape."""


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise EncodingError(
            f"unknown activation_format {fmt!r}; expected one of {', '.join(FORMATS)}"
        )


def _numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype that carries wire dtype `name` (bfloat16 as uint16)."""
    if name == "bfloat16":
        return np.dtype("<u2")
    try:
        dt = np.dtype(name)
    except TypeError as exc:
        raise EncodingError(f"unsupported dtype {name!r}") from exc
    if dt.kind not in "fiub":
        raise EncodingError(f"unsupported dtype {name!r}")
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns to float32: the pattern is the float32's high half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Narrow float32 values that are exactly bfloat16 back to their 16-bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    if np.any(bits & 0xFFFF):
        raise EncodingError("values are not exactly representable as bfloat16")
    return (bits >> 16).astype(np.uint16)


def json_numbers(values: np.ndarray) -> Any:
    """Nested lists of Python numbers; non-finite floats become their string spellings
    ("Infinity", "-Infinity", "NaN"), which strict JSON has no numbers for."""
    if values.dtype.kind != "f":
        return values.tolist()
    wide = values.astype(np.float64)
    if np.isfinite(wide).all():
        return wide.tolist()
    spelled = wide.astype(object)
    spelled[np.isposinf(wide)] = "Infinity"
    spelled[np.isneginf(wide)] = "-Infinity"
    spelled[np.isnan(wide)] = "NaN"
    return spelled.tolist()


def _json_values(raw: np.ndarray, dtype: str) -> Any:
    return json_numbers(_bf16_bits_to_float32(raw) if dtype == "bfloat16" else raw)


def encode_array(raw: np.ndarray, fmt: str, dtype: Optional[str] = None) -> dict[str, Any]:
    """`{"shape", "dtype", "data"}` for one array in wire format `fmt`.

    `raw` holds the values' bytes; `dtype` is their wire name when numpy has no type for
    it (bfloat16 arrives as its uint16 bit pattern with dtype "bfloat16").
    """
    _check_format(fmt)
    raw = np.asarray(raw)
    dtype = dtype or raw.dtype.name
    shape = list(raw.shape)
    if fmt == "none":
        return {"shape": shape, "dtype": dtype, "data": None}
    if fmt == "base64":
        wire = np.ascontiguousarray(raw, dtype=_numpy_dtype(dtype))
        data: Any = base64.b64encode(wire.tobytes()).decode("ascii")
    else:
        data = _json_values(raw, dtype)
    return {"shape": shape, "dtype": dtype, "data": data}


def encode_capture(capture: WireCapture, fmt: str) -> dict[str, Any]:
    """The wire object of one capture: its metadata, `encoding`, `data`, and any extras."""
    _check_format(fmt)
    obj = capture.metadata()
    arrays = capture.wire_arrays()
    raw, dtype = arrays.pop("data")
    obj["encoding"] = fmt
    obj["data"] = encode_array(raw, fmt, dtype)["data"]
    for name, (extra, extra_dtype) in arrays.items():
        obj[name] = encode_array(extra, fmt, extra_dtype)
    return obj


def decode_array(
    data: Any, shape: list[int], dtype: str, encoding: str
) -> Optional[np.ndarray]:
    """The numpy array behind wire `data`; None for the `none` encoding.

    float32/float16 and integer dtypes decode to themselves; bfloat16 decodes to
    float32 (exact). A length or shape that disagrees with `shape` is an error, so a
    truncated transfer cannot pass as a smaller tensor.
    """
    _check_format(encoding)
    if encoding == "none":
        return None
    carrier = _numpy_dtype(dtype)
    shape = [int(s) for s in shape]
    if encoding == "base64":
        raw = base64.b64decode(data, validate=True)
        expected = int(np.prod(shape, dtype=np.int64)) * carrier.itemsize
        if len(raw) != expected:
            raise EncodingError(
                f"base64 data holds {len(raw)} bytes; shape {shape} of {dtype} needs {expected}"
            )
        values = np.frombuffer(raw, dtype=carrier).reshape(shape)
        if dtype == "bfloat16":
            return _bf16_bits_to_float32(values)
        return values.astype(carrier.newbyteorder("="), copy=True)
    if carrier.kind in "iub" and dtype != "bfloat16":
        values = np.asarray(data, dtype=carrier.newbyteorder("="))
    else:
        # numpy parses the "Infinity"/"-Infinity"/"NaN" strings itself when building a
        # float64 array, so non-finite values need no per-element pass.
        values = np.asarray(data, dtype=np.float64)
        target = np.float32 if dtype == "bfloat16" else carrier.newbyteorder("=")
        values = values.astype(target)
    if list(values.shape) != shape:
        if values.size != int(np.prod(shape, dtype=np.int64)):
            raise EncodingError(f"json data of shape {list(values.shape)} does not match {shape}")
        values = values.reshape(shape)
    return values


def decode_capture(obj: Mapping[str, Any]) -> Optional[np.ndarray]:
    """The main tensor of a wire capture as numpy (None when it was sent with `none`)."""
    return decode_array(obj.get("data"), obj["shape"], obj["dtype"], obj["encoding"])


def decode_capture_extras(obj: Mapping[str, Any]) -> dict[str, Optional[np.ndarray]]:
    """A router capture's companions (`experts`, `weights`, ...) as numpy arrays."""
    out: dict[str, Optional[np.ndarray]] = {}
    for key, value in obj.items():
        if isinstance(value, Mapping) and {"shape", "dtype", "data"} <= value.keys():
            out[key] = decode_array(value["data"], value["shape"], value["dtype"], obj["encoding"])
    return out
