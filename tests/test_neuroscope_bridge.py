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
from neuroscope_server import STORE, STORE_HOOK, research_roots, running_server

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


# ----------------------------------------------------------------------------- extraction, steering, text completions, store analyses


@pytest.fixture(scope="module")
def research(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server with the research fixtures (tests/neuroscope_server.py); its URL and its store root."""
    stores, saes = research_roots(tmp_path_factory.mktemp("research"))
    with running_server(store_root=stores, sae_roots=(saes,)) as url:
        yield url, stores


DOCUMENTS = [f"Document {i}: the cat sat on the mat." for i in range(6)]


def test_extraction_job_runs_to_a_store_that_equals_run_with_cache(research: tuple[str, Path], reference_kit: Any) -> None:
    import mlx_engine

    url, root = research
    client = NeuroScopeClient(url)
    job = client.start_extraction(DOCUMENTS, [STORE_HOOK], context_size=32, batch_size=4)
    assert job["state"] == "running" and job["documents_total"] == len(DOCUMENTS)
    done = client.wait_for_extraction(job["id"], poll_s=0.05, timeout=120)
    assert done["state"] == "completed" and done["documents_done"] == len(DOCUMENTS) and done["error"] is None
    assert job["id"] in [j["id"] for j in client.list_extractions()]
    assert client.extraction_progress(job["id"]) == done
    store = mlx_engine.ActivationStore.open(root / done["store"])
    assert store.complete and store.num_tokens == done["tokens_done"]
    docs, _ = store.index()
    first = np.flatnonzero(np.asarray(docs[0:len(docs)]) == 0)
    tokens = [int(t) for t in store.tokens()[first]]
    expected = np.array(mlx_engine.run_with_cache(reference_kit, tokens, [STORE_HOOK])[STORE_HOOK])
    np.testing.assert_allclose(store.rows(STORE_HOOK)[first], expected, rtol=RECOMPUTE_RTOL, atol=RECOMPUTE_ATOL)
    assert client.store_stats(done["store"], STORE_HOOK)["summary"]["tokens"] == done["tokens_done"]


def test_extraction_jobs_cancel_and_their_errors_reach_the_caller(research: tuple[str, Path]) -> None:
    client = NeuroScopeClient(research[0])
    job = client.start_extraction(DOCUMENTS * 400, [STORE_HOOK], context_size=32, batch_size=1)
    with pytest.raises(TimeoutError, match=job["id"]):
        client.wait_for_extraction(job["id"], poll_s=0.01, timeout=0.0)
    cancelled = client.cancel_extraction(job["id"])
    assert cancelled["state"] == "cancelled" and cancelled["documents_done"] < cancelled["documents_total"]
    assert client.wait_for_extraction(job["id"])["state"] == "cancelled"
    with pytest.raises(NeuroScopeError) as missing:
        client.extraction_progress("extract-nosuchjob")
    assert missing.value.status == 404 and missing.value.code == "extract_job_not_found"
    with pytest.raises(NeuroScopeError) as bad:
        client.start_extraction(DOCUMENTS, ["layers.99.residual"])
    assert bad.value.status == 400 and "out of range" in bad.value.message


def test_steering_vector_is_the_mean_difference_and_steers(research: tuple[str, Path], reference_kit: Any) -> None:
    """The vector equals the in-process mean difference; sent back as an intervention with a scale, the
    edited residual differs from the plain one by exactly scale x vector at every position."""
    import mlx.core as mx

    import mlx_engine

    client = NeuroScopeClient(research[0])
    positive, negative = ["I love this.", "What a joy!"], ["I hate this."]
    sv = client.steering_vector(1, positive, negative)
    assert sv["hook_id"] == STORE_HOOK and (sv["n_positive"], sv["n_negative"]) == (2, 1)
    vector = np.array(sv["vector"]["data"], dtype=np.float32)

    def mean_rows(prompts: list[str]) -> np.ndarray:
        rows = [np.array(mlx_engine.run_with_cache(reference_kit, p, [STORE_HOOK])[STORE_HOOK].astype(mx.float32)) for p in prompts]
        return np.mean([r.mean(axis=0) for r in rows], axis=0)

    np.testing.assert_allclose(vector, mean_rows(positive) - mean_rows(negative), rtol=1e-4, atol=1e-4)
    assert sv["norm"] == pytest.approx(float(np.linalg.norm(vector)), rel=1e-5)
    steer = dict(sv["intervention"], scale=3.0)
    plain = client.complete_with_activations("The weather", [STORE_HOOK], max_tokens=1)
    steered = client.complete_with_activations("The weather", [STORE_HOOK], max_tokens=1, interventions=[steer])
    delta = steered.captures[STORE_HOOK][0].array - plain.captures[STORE_HOOK][0].array
    np.testing.assert_allclose(delta, np.broadcast_to(3.0 * vector, delta.shape), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_text_completion_captures_equal_run_with_cache(research: tuple[str, Path], reference_kit: Any, stream: bool) -> None:
    """POST /v1/completions/with_activations: the raw prompt (no chat template) and its captures."""
    from mlx_engine.loading import tokenize

    client = NeuroScopeClient(research[0])
    result = client.complete_with_activations("Once upon a time", REFERENCE_HOOKS, max_tokens=3, stream=stream)
    if stream:
        assert isinstance(result, ActivationStream)
        chunks = [c for c in result if c.token_id is not None]
        assert "".join(c.text for c in chunks) == result.response()["choices"][0]["text"]
        result = ActivationResult.from_response(result.response())
    assert result.response["object"] == "text_completion"
    prompt_ids = result.response["prompt_token_ids"]
    assert prompt_ids == list(tokenize(reference_kit, "Once upon a time"))
    assert len(result.tokens) == 3 and result.text == result.response["choices"][0]["text"]
    sequence = prompt_ids + result.response["generated_token_ids"]
    for hook_id, captures in result.captures.items():
        assert [c.step for c in captures] == [0, 1, 2]
        for capture in captures:
            start, end = capture.positions
            expected = reference_rows(reference_kit, sequence[:end], hook_id, start, end)
            np.testing.assert_allclose(capture.array, expected, rtol=RECOMPUTE_RTOL, atol=RECOMPUTE_ATOL)
    converted = convert_activations_for_neuroscope(result)
    jsonschema.Draft202012Validator(load_schema()).validate(converted)
    assert converted["text"] == result.text


def test_store_distribution_and_polysemantic_ranking(research: tuple[str, Path]) -> None:
    """A neuron's histogram against numpy's over the stored rows; the ranking's order and its neuron subset."""
    import mlx_engine

    url, root = research
    client = NeuroScopeClient(url)
    column = np.asarray(mlx_engine.ActivationStore.open(root / STORE).rows(STORE_HOOK)[:, 2], dtype=np.float64)
    dist = client.neuron_distribution(STORE, STORE_HOOK, 2, bins=8)
    assert dist["sample_rows"] == dist["total_rows"] == len(column)
    counts, _ = np.histogram(column, bins=np.array(dist["edges"]))
    assert dist["counts"] == counts.tolist()
    assert dist["median"] == pytest.approx(float(np.median(column)), rel=1e-5)
    ranked = client.polysemantic_neurons(STORE, STORE_HOOK, top=3)
    width = client.store_stats(STORE, STORE_HOOK)["summary"]["width"]
    assert len(ranked["neurons"]) == 3 and ranked["scored"] == width
    clusters = [n["clusters"] for n in ranked["neurons"]]
    assert clusters == sorted(clusters, reverse=True)
    subset = client.polysemantic_neurons(STORE, STORE_HOOK, neurons=[2, 5], k=4)
    assert subset["scored"] == 2 and sorted(n["neuron"] for n in subset["neurons"]) == [2, 5]
