"""Activation wire formats end to end: bytes on the wire and encode+decode throughput.

Measured on real captures from the generation loop (the residual stream of every
layer), not on synthetic arrays, so per-capture overhead (metadata, many small
tensors in a streamed step) counts as it does for a client. End to end means: the
server's side (encode each capture, serialise the response) plus the client's side
(parse, and turn every tensor into a numpy array).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import numpy as np

Captures = dict[str, list[Any]]


def _json_like(captures: Captures, fmt: str) -> tuple[Callable[[], bytes], Callable[[bytes], list[np.ndarray]]]:
    from mlx_engine.wire.codec import decode_capture, encode_capture

    def encode() -> bytes:
        body = {hook: [encode_capture(c, fmt) for c in caps] for hook, caps in captures.items()}
        return json.dumps(body).encode()

    def decode(blob: bytes) -> list[np.ndarray]:
        body = json.loads(blob)
        return [decode_capture(obj) for caps in body.values() for obj in caps]

    return encode, decode


def _safetensors(captures: Captures) -> tuple[Callable[[], bytes], Callable[[bytes], list[np.ndarray]]]:
    from mlx_engine.hooks.capture import mlx_to_numpy
    from mlx_engine.wire.files import captures_to_safetensors, safetensors_to_captures

    def encode() -> bytes:
        return captures_to_safetensors(captures)

    def decode(blob: bytes) -> list[np.ndarray]:
        back, _ = safetensors_to_captures(blob)
        return [mlx_to_numpy(c.array)[0] for caps in back.values() for c in caps]

    return encode, decode


def measure(captures: Captures, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per format: wire bytes, encode and decode seconds (medians), MB/s of tensor data."""
    raw = sum(c.array.nbytes for caps in captures.values() for c in caps)
    n = sum(len(caps) for caps in captures.values())
    out: dict[str, dict[str, float]] = {}
    for fmt in ("json", "base64", "safetensors"):
        encode, decode = _safetensors(captures) if fmt == "safetensors" else _json_like(captures, fmt)
        enc_s, dec_s, size = [], [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            blob = encode()
            t1 = time.perf_counter()
            arrays = decode(blob)
            t2 = time.perf_counter()
            if len(arrays) != n:
                raise RuntimeError(f"{fmt}: decoded {len(arrays)} tensors, expected {n}")
            enc_s.append(t1 - t)
            dec_s.append(t2 - t1)
            size = len(blob)
        enc, dec = statistics.median(enc_s), statistics.median(dec_s)
        out[fmt] = {
            "tensor_bytes": raw,
            "captures": n,
            "wire_bytes": size,
            "encode_s": enc,
            "decode_s": dec,
            "mb_per_s": raw / (enc + dec) / 1e6,
        }
    return out


def measure_wire_formats(kit: Any, prompt: list[int], steps: int) -> dict[str, Any]:
    """Residual of every layer over `steps` tokens from a one-token prompt.

    One step is the captures handed out with one generated token (T = 1 per layer);
    the `steps`-token capture is every step's captures together (one row per token).
    """
    import mlx_engine

    hooks = [{"layer_name": i, "component": "residual"} for i in range(kit.arch_info.num_layers)]
    per_step: list[Captures] = []
    for _, acts in mlx_engine.create_generator_with_activations(kit, prompt[:1], hooks, max_tokens=steps):
        per_step.append(acts)
    if len(per_step) < 2:
        raise RuntimeError("the wire benchmark needs at least two steps")
    whole: Captures = {}
    for acts in per_step:
        for hook, caps in acts.items():
            whole.setdefault(hook, []).extend(caps)
    first_layer = next(iter(whole.values()))
    rows = sum(c.array.shape[0] for c in first_layer)
    return {
        "one_step": measure(per_step[1]),
        "all_steps": measure(whole, repeats=2),
        "steps": len(per_step),
        "rows_per_layer": rows,
        "dtype": first_layer[0].dtype,
        "num_layers": kit.arch_info.num_layers,
    }
