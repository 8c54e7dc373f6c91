"""The NeuroScope bridge against a real server: Python client, converter, presets, endpoint table."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from neuroscope_server import running_server

from mlx_engine.integrations.neuroscope.client import ActivationResult, ActivationStream, NeuroScopeClient, NeuroScopeError
from mlx_engine.integrations.neuroscope.endpoints import ENDPOINTS, endpoints_markdown
from mlx_engine.integrations.neuroscope.format import convert_activations_for_neuroscope, load_schema
from mlx_engine.integrations.neuroscope.presets import (
    ATTENTION_COMPONENTS,
    create_attention_analysis_hooks,
    create_hook_specs_for_circuit_analysis,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "neuroscope-format.md"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_server() as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[NeuroScopeClient]:
    c = NeuroScopeClient(base_url)
    yield c
    c.clear_hooks()


@pytest.fixture(scope="module")
def hook_points(base_url: str) -> dict[str, Any]:
    return NeuroScopeClient(base_url).hook_points()


def expected_shape(promised: list[Any], capture: Any) -> list[int]:
    """The hook-point listing's shape with T (rows) and S (keys) filled in from the capture."""
    rows = capture.positions[1] - capture.positions[0]
    keys = len(capture.key_positions or [])
    return [rows if s == "T" else keys if s == "S" else s for s in promised]


def promised_shape(hook_points: dict[str, Any], layer: Any, component: str) -> list[Any]:
    if layer is None:
        return hook_points["embedding"]["shape"]
    return hook_points["layers"][layer]["components"][component]["shape"]


def test_health_models_and_load(client: NeuroScopeClient) -> None:
    health = client.health()
    assert health["status"] == "ok" and "default" in health["models"]
    assert [m["id"] for m in client.list_models()] == ["default"]
    assert client.load_model("default")["id"] == "default"
    assert client.model == "default"


def test_server_errors_carry_the_servers_message(client: NeuroScopeClient) -> None:
    with pytest.raises(NeuroScopeError) as caught:
        client.register_hooks(["layers.99.residual"])
    assert caught.value.status == 400
    assert "out of range" in caught.value.message and "4 layers" in caught.value.message
    assert caught.value.code == "invalid_hook" and caught.value.type == "invalid_request_error"
    with pytest.raises(NeuroScopeError) as missing:
        client.hook_points("no-such-model")
    assert missing.value.status == 404


def test_register_and_clear_preset_hooks(client: NeuroScopeClient, hook_points: dict[str, Any]) -> None:
    specs = create_hook_specs_for_circuit_analysis(hook_points=hook_points)
    registered = client.register_hooks(specs)
    assert [h["hook_id"] for h in registered] == ["embedding"] + [
        f"layers.{i}.{c}" for i in range(hook_points["num_layers"]) for c in ("residual", "attention", "mlp")
    ]
    assert client.clear_hooks() == []


def test_presets_take_names_from_the_listing_and_refuse_what_it_lacks(hook_points: dict[str, Any]) -> None:
    assert create_hook_specs_for_circuit_analysis(2) == create_hook_specs_for_circuit_analysis(
        2, hook_points=hook_points
    )
    specs = create_attention_analysis_hooks([0, 3], hook_points=hook_points)
    assert [s["component"] for s in specs] == list(ATTENTION_COMPONENTS) * 2
    assert specs[0]["layer_name"] == "layers.0" and specs[-1]["layer_name"] == "layers.3"
    with pytest.raises(ValueError, match="out of range"):
        create_attention_analysis_hooks([4], hook_points=hook_points)
    no_qkv = json.loads(json.dumps(hook_points))
    for layer in no_qkv["layers"]:
        del layer["components"]["query"]
    with pytest.raises(ValueError, match="offers no 'query'"):
        create_attention_analysis_hooks([1], hook_points=no_qkv)
    with pytest.raises(ValueError, match="num_layers"):
        create_hook_specs_for_circuit_analysis()


def test_generate_decodes_real_captures_of_the_promised_shape(
    client: NeuroScopeClient, hook_points: dict[str, Any]
) -> None:
    hooks = create_hook_specs_for_circuit_analysis(1) + create_attention_analysis_hooks([1])
    result = client.generate_with_activations("Hello there", hooks, max_tokens=3)
    assert isinstance(result, ActivationResult)
    assert len(result.tokens) == 3 and result.prompt_tokens
    assert len(result.captures) == len(hooks)
    for hook_id, captures in result.captures.items():
        assert [c.step for c in captures] == [0, 1, 2]
        for capture in captures:
            assert capture.hook_id == hook_id and capture.encoding == "base64"
            promised = promised_shape(hook_points, capture.layer, capture.component)
            assert list(capture.array.shape) == expected_shape(promised, capture) == capture.shape
            if capture.component == "attention_scores":
                # The prompt's rows cannot see later keys (-inf); a decode row sees every key.
                assert not np.isnan(capture.array).any()
                assert np.isneginf(capture.array).any() == (capture.step == 0)
            else:
                assert np.isfinite(capture.array).all()
    pattern = result.captures["layers.1.attention_pattern"][0].array
    assert ((pattern >= 0) & (pattern <= 1)).all()
    assert (pattern.sum(-1) <= 1 + 1e-5).all() and (pattern.sum(-1) > 0).all()


def test_json_and_base64_carry_the_same_numbers(client: NeuroScopeClient) -> None:
    hooks = ["layers.0.residual", {"layer_name": "layers.1", "component": "attention_scores"}]
    by_format = {
        fmt: client.generate_with_activations("Hi", hooks, activation_format=fmt, max_tokens=2)
        for fmt in ("json", "base64")
    }
    for hook_id, captures in by_format["json"].captures.items():
        for a, b in zip(captures, by_format["base64"].captures[hook_id]):
            np.testing.assert_array_equal(a.array, b.array)
    none = client.generate_with_activations("Hi", hooks, activation_format="none", max_tokens=1)
    assert all(c.array is None for caps in none.captures.values() for c in caps)


def test_streaming_yields_tokens_with_their_captures(client: NeuroScopeClient) -> None:
    hooks = ["embedding", {"layer_name": "layers.2", "component": "mlp"}]
    whole = client.generate_with_activations("Hi", hooks, max_tokens=3)
    stream = client.generate_with_activations("Hi", hooks, max_tokens=3, stream=True)
    assert isinstance(stream, ActivationStream)
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.token_id is not None]
    assert [c.token_text for c in token_chunks] == whole.tokens
    assert [c.captures["embedding"][0].step for c in token_chunks] == [0, 1, 2]
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    merged = stream.response()
    assert merged["generated_tokens_text"] == whole.tokens
    assert merged["prompt_tokens_text"] == whole.prompt_tokens
    streamed = ActivationResult.from_response(merged)
    for hook_id, captures in whole.captures.items():
        for a, b in zip(captures, streamed.captures[hook_id]):
            np.testing.assert_array_equal(a.array, b.array)


def test_converted_response_matches_the_schema_and_the_data(client: NeuroScopeClient) -> None:
    hooks = create_attention_analysis_hooks([1]) + ["layers.0.router"]
    result = client.generate_with_activations("Hello", hooks, max_tokens=2)
    converted = convert_activations_for_neuroscope(result)
    text = json.dumps(converted, allow_nan=False)  # strict JSON: no NaN/Infinity literals
    jsonschema.Draft202012Validator(load_schema()).validate(json.loads(text))
    assert converted["prompt_tokens"] == result.prompt_tokens
    assert converted["generated_tokens"] == result.tokens
    assert set(converted["activations"]) == set(result.captures)
    for hook_id, entries in converted["activations"].items():
        for entry, capture in zip(entries, result.captures[hook_id]):
            assert len(entry["data"]) == int(np.prod(entry["shape"]))
            flat = np.array([float(v) for v in entry["data"]], dtype=np.float32).reshape(entry["shape"])
            np.testing.assert_array_equal(flat, capture.array)
    scores = converted["activations"]["layers.1.attention_scores"][0]["data"]
    assert "-Infinity" in scores
    router = converted["activations"]["layers.0.router"][0]
    assert set(router["extras"]) == {"experts", "weights"}
    assert router["extras"]["experts"]["dtype"].startswith(("int", "uint"))
    assert router["extras"]["experts"]["shape"][-1] == 2  # the default model routes each token to 2 experts


def test_schema_rejects_what_neuroscope_cannot_read(client: NeuroScopeClient) -> None:
    converted = convert_activations_for_neuroscope(
        client.generate_with_activations("Hi", ["layers.0.residual"], max_tokens=1)
    )
    validator = jsonschema.Draft202012Validator(load_schema())
    validator.validate(converted)
    broken = json.loads(json.dumps(converted))
    broken["activations"]["layers.0.residual"][0]["data"][0] = "-inf"
    assert not validator.is_valid(broken)
    del broken["prompt_tokens"]
    assert not validator.is_valid(broken)


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_endpoints_agree_with_the_servers_openapi(base_url: str) -> None:
    from urllib.request import urlopen

    with urlopen(f"{base_url}/openapi.json") as response:
        doc = json.load(response)
    for ep in ENDPOINTS:
        operation = doc["paths"][ep.path][ep.method.lower()]
        if ep.body:
            request = _resolve(doc, operation["requestBody"]["content"]["application/json"]["schema"])
            assert {f.name for f in ep.body} <= set(request["properties"]), ep.name
            required = set(request.get("required", []))
            assert required <= {f.name for f in ep.body if f.required}, ep.name
        params = {p["name"] for p in operation.get("parameters", [])}
        assert {f.name for f in ep.query} | set(ep.path_params) <= params, ep.name
        reply = _resolve(doc, operation["responses"]["200"]["content"]["application/json"]["schema"])
        assert set(ep.reads) <= set(reply["properties"]), ep.name


def test_doc_holds_the_generated_endpoint_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = re.search(r"<!-- endpoints:begin -->\n(.*)<!-- endpoints:end -->", text, re.S)
    assert table is not None and table.group(1) == endpoints_markdown()


# The same model in this process, as the reference the server's captures must equal. The server
# decodes step by step through its KV cache; run_with_cache recomputes the whole sequence at
# once, so rows agree to float32 rounding of a different reduction order, not bit for bit.
RECOMPUTE_ATOL = 2e-4
RECOMPUTE_RTOL = 1e-4
REFERENCE_HOOKS = ["layers.0.residual", "layers.3.residual", {"layer_name": 3, "component": "attention_pattern"}]


@pytest.fixture(scope="module")
def reference_kit() -> Any:
    import mlx_engine

    return mlx_engine.load_model("default")


def reference_rows(kit: Any, tokens: list[int], hook_id: str, start: int, end: int, interventions: Any = None) -> np.ndarray:
    """The rows [start, end) of `hook_id` from one forward pass over `tokens` in this process."""
    import mlx.core as mx

    import mlx_engine

    cache = mlx_engine.run_with_cache(kit, tokens, REFERENCE_HOOKS, interventions=interventions)
    full = np.array(cache[hook_id].astype(mx.float32))
    if full.ndim == 3:  # [heads, T, S]: this step's query rows over the keys it saw
        return full[:, start:end, :end]
    return full[start:end]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_client_captures_equal_run_with_cache(client: NeuroScopeClient, reference_kit: Any, stream: bool) -> None:
    result = client.generate_with_activations("Hello", REFERENCE_HOOKS, max_tokens=4, stream=stream)
    if stream:
        assert isinstance(result, ActivationStream)
        for _ in result:  # each event decodes as it arrives; the merged body is checked below
            pass
        result = ActivationResult.from_response(result.response())
    prompt_ids = result.response["prompt_token_ids"]
    generated = result.response["generated_token_ids"]
    sequence = prompt_ids + generated
    checked = 0
    for hook_id, captures in result.captures.items():
        assert [c.step for c in captures] == [0, 1, 2, 3]
        for capture in captures:
            start, end = capture.positions
            expected = reference_rows(reference_kit, sequence[:end], hook_id, start, end)
            np.testing.assert_allclose(capture.array, expected, rtol=RECOMPUTE_RTOL, atol=RECOMPUTE_ATOL, err_msg=f"{hook_id} step {capture.step}")
            checked += 1
    assert checked == 4 * len(REFERENCE_HOOKS)


def test_client_interventions_reach_the_model(client: NeuroScopeClient, reference_kit: Any) -> None:
    """An ablation sent through the client changes the captures exactly as it does in-process."""
    interventions = [{"layer_name": "blocks.1.attn.hook_z", "op": "zero", "heads": [0, 2]}]
    plain = client.generate_with_activations("Hello", REFERENCE_HOOKS, max_tokens=1)
    edited = client.generate_with_activations("Hello", REFERENCE_HOOKS, max_tokens=1, interventions=interventions)
    prompt_ids = edited.response["prompt_token_ids"]
    after = edited.captures["layers.3.residual"][0]
    assert not np.allclose(after.array, plain.captures["layers.3.residual"][0].array, atol=1e-3)
    expected = reference_rows(reference_kit, prompt_ids, "layers.3.residual", 0, len(prompt_ids), interventions)
    np.testing.assert_allclose(after.array, expected, rtol=RECOMPUTE_RTOL, atol=RECOMPUTE_ATOL)
    assert edited.response["interventions"][0]["op"] == "zero"
