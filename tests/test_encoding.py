"""Wire formats: exact round trips through real JSON text, base64 and safetensors bytes."""

from __future__ import annotations

import io
import json
import struct
from typing import Any, Optional

import mlx.core as mx
import numpy as np
import pytest
import safetensors

from mlx_engine.wire.codec import EncodingError, decode_capture, decode_capture_extras, encode_capture
from mlx_engine.wire.files import captures_to_safetensors, parse_tensor_key, safetensors_to_captures
from mlx_engine.hooks.capture import Capture

WIRE_KEYS = {
    "hook_id", "layer_name", "layer", "component", "step", "positions",
    "key_positions", "is_input", "shape", "dtype", "encoding", "data",
}


def make_capture(
    array: mx.array,
    component: str = "residual",
    layer: Optional[int] = 1,
    step: int = 0,
    positions: tuple[int, int] = (0, 3),
    key_positions: Optional[list[int]] = None,
    extras: Optional[dict[str, mx.array]] = None,
) -> Capture:
    hook_id = "embedding" if layer is None else f"layers.{layer}.{component}"
    return Capture(
        hook_id=hook_id,
        layer_name=hook_id if layer is None else f"model.layers.{layer}",
        layer=layer,
        component=component,
        step=step,
        positions=positions,
        is_input=False,
        array=array,
        key_positions=key_positions,
        extras=extras or {},
    )


def over_the_wire(obj: dict[str, Any]) -> dict[str, Any]:
    """What a client receives: strict JSON text (no NaN/Infinity literals), parsed back."""
    return json.loads(json.dumps(obj, allow_nan=False))


def float32_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 5, 4)).astype(np.float32) * np.float32(7.3)
    flat = values.reshape(-1)
    # Values whose decimal spelling is hard: subnormals, extremes, signed zero.
    flat[:6] = [1e-45, -3.4028235e38, 1.1754942e-38, -0.0, 0.1, 16777217.0]
    return values


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


@pytest.mark.parametrize("fmt", ["json", "base64"])
def test_float32_round_trip_is_bit_exact(fmt: str) -> None:
    values = float32_values()
    obj = over_the_wire(encode_capture(make_capture(mx.array(values)), fmt))
    assert set(obj) == WIRE_KEYS
    assert obj["encoding"] == fmt and obj["dtype"] == "float32" and obj["shape"] == [3, 5, 4]
    decoded = decode_capture(obj)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(bits(decoded), bits(values))


@pytest.mark.parametrize("fmt", ["json", "base64"])
def test_float16_round_trip_is_bit_exact(fmt: str) -> None:
    values = np.clip(float32_values(), -65504, 65504).astype(np.float16)
    values.reshape(-1)[6:9] = [np.float16(6e-8), np.float16(65504), np.float16(-6.1e-5)]
    obj = over_the_wire(encode_capture(make_capture(mx.array(values)), fmt))
    assert obj["dtype"] == "float16"
    decoded = decode_capture(obj)
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(bits(decoded), bits(values))


@pytest.mark.parametrize("fmt", ["json", "base64"])
def test_bfloat16_decodes_to_the_exact_float32_values(fmt: str) -> None:
    array = mx.array(float32_values()).astype(mx.bfloat16)
    expected = np.array(array.astype(mx.float32))
    obj = over_the_wire(encode_capture(make_capture(array), fmt))
    assert obj["dtype"] == "bfloat16"
    decoded = decode_capture(obj)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(bits(decoded), bits(expected))
    if fmt == "base64":
        # The payload is the 16-bit pattern itself, two bytes a value.
        import base64

        raw = np.frombuffer(base64.b64decode(obj["data"]), dtype="<u2")
        np.testing.assert_array_equal(raw, np.array(array.view(mx.uint16)).reshape(-1))


@pytest.mark.parametrize("fmt", ["json", "base64"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_masked_scores_keep_minus_infinity(fmt: str, dtype: mx.Dtype) -> None:
    scores = np.array(
        [[[0.5, -np.inf, -np.inf], [1.25, -2.0, -np.inf]],
         [[np.inf, np.nan, -np.inf], [3.0, 0.0, -1.5]]],
        dtype=np.float32,
    )
    capture = make_capture(
        mx.array(scores).astype(dtype), component="attention_scores", positions=(1, 3),
        key_positions=[0, 1, 2],
    )
    obj = over_the_wire(encode_capture(capture, fmt))
    assert obj["key_positions"] == [0, 1, 2] and obj["positions"] == [1, 3]
    if fmt == "json":
        assert obj["data"][0][0][1] == "-Infinity"
        assert obj["data"][1][0][0] == "Infinity"
        assert obj["data"][1][0][1] == "NaN"
    decoded = decode_capture(obj).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(decoded), np.isnan(scores))
    finite_or_inf = ~np.isnan(scores)
    np.testing.assert_array_equal(decoded[finite_or_inf], scores[finite_or_inf])


def test_none_sends_metadata_only() -> None:
    obj = over_the_wire(encode_capture(make_capture(mx.zeros((2, 8))), "none"))
    assert set(obj) == WIRE_KEYS
    assert obj["data"] is None and obj["shape"] == [2, 8] and obj["encoding"] == "none"
    assert decode_capture(obj) is None


@pytest.mark.parametrize("fmt", ["json", "base64", "none"])
def test_router_extras_travel_with_the_capture(fmt: str) -> None:
    logits = mx.array(np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4))
    experts = mx.array([[3, 1], [0, 2], [1, 3]], dtype=mx.uint32)
    weights = mx.array([[0.75, 0.25], [0.5, 0.5], [0.625, 0.375]], dtype=mx.float32)
    capture = make_capture(logits, component="router", extras={"experts": experts, "weights": weights})
    obj = over_the_wire(encode_capture(capture, fmt))
    assert obj["experts"]["shape"] == [3, 2] and obj["experts"]["dtype"] == "uint32"
    extras = decode_capture_extras(obj)
    assert set(extras) == {"experts", "weights"}
    if fmt == "none":
        assert extras["experts"] is None and obj["weights"]["data"] is None
        return
    np.testing.assert_array_equal(extras["experts"], np.array(experts))
    assert extras["experts"].dtype == np.uint32
    np.testing.assert_array_equal(extras["weights"], np.array(weights))
    np.testing.assert_array_equal(decode_capture(obj), np.array(logits))


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(EncodingError, match="unknown activation_format 'msgpack'"):
        encode_capture(make_capture(mx.zeros((1, 2))), "msgpack")
    obj = encode_capture(make_capture(mx.zeros((1, 2))), "json")
    obj["encoding"] = "hex"
    with pytest.raises(EncodingError):
        decode_capture(obj)


def test_truncated_base64_is_an_error() -> None:
    obj = encode_capture(make_capture(mx.ones((4, 4))), "base64")
    obj["shape"] = [5, 4]
    with pytest.raises(EncodingError, match="needs 80"):
        decode_capture(obj)


def test_json_shape_mismatch_is_an_error() -> None:
    obj = encode_capture(make_capture(mx.ones((2, 3))), "json")
    obj["shape"] = [2, 4]
    with pytest.raises(EncodingError):
        decode_capture(obj)


def safetensors_header(blob: bytes) -> dict[str, Any]:
    """The header as the safetensors spec defines it: u64 length, then JSON."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length])


def test_safetensors_round_trip_keeps_values_metadata_and_order() -> None:
    rng = np.random.default_rng(1)
    emb0a = mx.array(rng.standard_normal((4, 8)).astype(np.float32)).astype(mx.bfloat16)
    emb0b = mx.array(rng.standard_normal((2, 8)).astype(np.float32)).astype(mx.bfloat16)
    emb1 = mx.array(rng.standard_normal((1, 8)).astype(np.float16))
    scores = mx.array(np.array([[[0.5, -np.inf], [0.25, 1.0]]], dtype=np.float32))
    router = mx.array(rng.standard_normal((1, 4)).astype(np.float32))
    by_hook = {
        "embedding": [
            make_capture(emb0a, "embedding", layer=None, step=0, positions=(0, 4)),
            make_capture(emb0b, "embedding", layer=None, step=0, positions=(4, 6)),
            make_capture(emb1, "embedding", layer=None, step=1, positions=(6, 7)),
        ],
        "layers.0.attention_scores": [
            make_capture(scores, "attention_scores", layer=0, step=0, positions=(0, 2),
                         key_positions=[0, 1]),
        ],
        "layers.2.router": [
            make_capture(router, "router", layer=2, step=1, positions=(6, 7), extras={
                "experts": mx.array([[2, 0]], dtype=mx.uint32),
                "weights": mx.array([[0.5, 0.5]], dtype=mx.float32),
            }),
        ],
    }
    blob = captures_to_safetensors(by_hook, {"model": "tiny-llama", "prompt": "hi"})

    # Any safetensors reader sees standard tensors, bfloat16 stored as BF16.
    tensors = dict(safetensors.deserialize(blob))
    assert tensors["embedding/step000000/chunk0000"]["dtype"] == "BF16"
    assert tensors["embedding/step000000/chunk0001"]["shape"] == [2, 8]
    assert tensors["embedding/step000001/chunk0000"]["dtype"] == "F16"
    assert "layers.2.router/step000001/chunk0000/experts" in tensors
    header = safetensors_header(blob)["__metadata__"]
    assert json.loads(header["embedding/step000000/chunk0001"])["positions"] == [4, 6]

    loaded, metadata = safetensors_to_captures(blob)
    assert metadata == {"model": "tiny-llama", "prompt": "hi"}
    assert set(loaded) == set(by_hook)
    for hook, originals in by_hook.items():
        assert len(loaded[hook]) == len(originals)
        for got, want in zip(loaded[hook], originals):
            assert got.metadata() == want.metadata()
            assert got.array.dtype == want.array.dtype
            assert mx.array_equal(got.array, want.array, equal_nan=True).item()
            assert set(got.extras) == set(want.extras)
            for name in want.extras:
                assert got.extras[name].dtype == want.extras[name].dtype
                assert mx.array_equal(got.extras[name], want.extras[name]).item()


def test_safetensors_names_sort_in_step_order_and_old_names_still_read() -> None:
    """Zero-padded step and chunk numbers sort as numbers; files written unpadded read back the same."""
    captures = [make_capture(mx.full((1, 2), float(step)), "mlp", layer=0, step=step, positions=(step, step + 1)) for step in range(12)]
    blob = captures_to_safetensors({"layers.0.mlp": captures})
    names = [n for n in dict(safetensors.deserialize(blob))]
    assert sorted(names) == [f"layers.0.mlp/step{s:06d}/chunk0000" for s in range(12)]
    assert parse_tensor_key("layers.0.mlp/step000011/chunk0002/experts") == ("layers.0.mlp", 11, 2, "experts")
    assert parse_tensor_key("layers.0.mlp/step11/chunk2") == ("layers.0.mlp", 11, 2, None)
    arrays, header = mx.load(io.BytesIO(blob), format="safetensors", return_metadata=True)
    def unpadded(name: str) -> str:
        parsed = parse_tensor_key(name)
        return name if parsed is None else f"{parsed[0]}/step{parsed[1]}/chunk{parsed[2]}" + (f"/{parsed[3]}" if parsed[3] else "")

    old = {unpadded(k): v for k, v in arrays.items()}
    old_header = {unpadded(k): v for k, v in header.items()}
    assert "layers.0.mlp/step10/chunk0" in old and "layers.0.mlp/step1/chunk0" in old
    buffer = io.BytesIO()
    mx.save_safetensors(buffer, old, metadata=old_header)
    loaded, _ = safetensors_to_captures(buffer.getvalue())
    assert [c.step for c in loaded["layers.0.mlp"]] == list(range(12))
    assert [float(c.array[0, 0].item()) for c in loaded["layers.0.mlp"]] == [float(s) for s in range(12)]


def test_safetensors_rejects_a_capture_filed_under_another_hook() -> None:
    capture = make_capture(mx.zeros((1, 2)), "mlp", layer=0)
    with pytest.raises(EncodingError):
        captures_to_safetensors({"layers.1.mlp": [capture]})


@pytest.mark.parametrize("fmt", ["json", "base64"])
def test_masked_scores_survive_the_server_to_client_path(fmt: str) -> None:
    """Encode, strict JSON text, parse, decode, as server and client do, on a masked score tensor.

    (How fast each format makes this trip is measured by the benchmarks: benchmarks/wire.py,
    and the "base64 >= 5x faster than json end to end" target in benchmarks/report.py.)
    """
    scores = np.random.default_rng(2).standard_normal((8, 32, 64)).astype(np.float32)
    scores[:, :, 40:] = -np.inf
    capture = make_capture(mx.array(scores), "attention_scores", key_positions=list(range(64)))
    text = json.dumps(encode_capture(capture, fmt), allow_nan=False)
    decoded = decode_capture(json.loads(text))
    assert decoded.shape == tuple(capture.shape)
    np.testing.assert_array_equal(decoded, scores)
