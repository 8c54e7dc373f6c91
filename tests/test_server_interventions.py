"""Interventions over HTTP: a real server (subprocess, tiny Llama) against the Python API in this process.

Every expected value comes from the engine run here on the same checkpoint
(`create_generator_with_activations(..., interventions=...)`, `steering_vector`), so the
checks compare the server with the real thing. Greedy decoding (temperature 0) makes
token ids comparable exactly. Captures are compared within 1e-5 absolute and steering
vectors within 1e-6 absolute (norms within 1e-6 relative): float32 on both sides, the
same code on the same checkpoint, so in practice they agree bit for bit.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import numpy as np
import pytest
import requests
from test_server_http import start_server

import mlx_engine
from mlx_engine.wire.codec import decode_capture

ATOL = 1e-5
USER = [{"role": "user", "content": "Write the json encoder."}]
PROMPT = "def encode(self, obj):"
MAX_TOKENS = 8
HOOK = {"layer_name": 2, "component": "residual"}


@pytest.fixture(scope="module")
def server(llama_checkpoint, tmp_path_factory):
    srv = start_server(
        ["--model", str(llama_checkpoint), "--capture-store-items", "8"],
        tmp_path_factory.mktemp("interventions") / "server.log",
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def http(server):
    session = requests.Session()

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 60)
        return session.request(method, server.url + path, **kw)

    return call


def ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def sse(server, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with requests.post(server.url + path, json={**body, "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def steer_vector(kit, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=kit.arch_info.d_model).astype(np.float32)


def b64(array: np.ndarray) -> dict[str, Any]:
    return {"data": base64.b64encode(array.astype("<f4").tobytes()).decode(), "dtype": "float32", "shape": list(array.shape)}


def python_run(kit, interventions, hooks=(HOOK,), max_tokens: int = MAX_TOKENS):
    tokens = mlx_engine.chat_tokens(kit, USER)
    steps = list(
        mlx_engine.create_generator_with_activations(kit, tokens, list(hooks), max_tokens=max_tokens, temp=0.0, interventions=interventions)
    )
    return [r.token for r, _ in steps], steps


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}


def hook_rows(response: dict[str, Any], hook_id: str) -> np.ndarray:
    return np.concatenate([decode_capture(c) for c in response["activations"][hook_id]], axis=-2)


def python_rows(steps, hook_id: str) -> np.ndarray:
    return np.concatenate([np.array(c.array) for _, acts in steps for c in acts[hook_id]], axis=-2)


# ----------------------------------------------------------------------------- (a) steering


def test_steering_add_changes_tokens_and_equals_the_python_api(http, llama_kit):
    v = steer_vector(llama_kit)
    steer = {"layer_name": "model.layers.1", "component": "residual", "op": "add", "vector": v.tolist(), "scale": 8.0}
    plain_tokens, _ = python_run(llama_kit, None)
    tokens, steps = python_run(llama_kit, [steer])
    assert tokens != plain_tokens, "the steering must change the greedy continuation"

    body = chat_body(activation_hooks=[HOOK], activation_format="base64", interventions=[steer])
    resp = ok(http("POST", "/v1/chat/completions/with_activations", json=body))
    assert resp["generated_token_ids"] == tokens
    # The captures come from the edited model: downstream of layer 1, equal to Python's.
    np.testing.assert_allclose(hook_rows(resp, "layers.2.residual"), python_rows(steps, "layers.2.residual"), atol=ATOL)
    (applied,) = resp["interventions"]
    assert applied["hook_id"] == "layers.1.residual" and applied["op"] == "add" and applied["scale"] == 8.0

    # The plain chat route and a base64 vector give the same text as the Python API.
    text = "".join(r.text for r, _ in steps)
    chat = ok(http("POST", "/v1/chat/completions", json=chat_body(interventions=[{**steer, "vector": b64(v)}])))
    assert chat["choices"][0]["message"]["content"] == text
    unsteered = ok(http("POST", "/v1/chat/completions", json=chat_body()))
    assert "interventions" not in unsteered and unsteered["choices"][0]["message"]["content"] != text

    # Text completions take the same field.
    ids = mlx_engine.tokenize(llama_kit, PROMPT)
    expected = "".join(r.text for r in mlx_engine.create_generator(llama_kit, ids, max_tokens=MAX_TOKENS, temp=0.0, interventions=[steer]))
    done = ok(http("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "interventions": [steer]}))
    assert done["choices"][0]["text"] == expected


def test_head_ablation_and_before_after_captures(http, llama_kit):
    ablate = [{"layer_name": 1, "component": "z", "op": "zero", "heads": [0, 2]}, {"layer_name": 0, "component": "mlp", "op": "scale", "scale": 0.5, "positions": "generated"}]
    hooks = [
        {"layer_name": 1, "component": "z", "hook_id": "z_before", "edit": "before"},
        {"layer_name": 1, "component": "z", "hook_id": "z_after"},
        HOOK,
    ]
    tokens, steps = python_run(llama_kit, ablate, hooks)
    resp = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(activation_hooks=hooks, interventions=ablate)))
    assert resp["generated_token_ids"] == tokens
    before, after = hook_rows(resp, "z_before"), hook_rows(resp, "z_after")
    assert {c["edit"] for c in resp["activations"]["z_before"]} == {"before"}
    assert {c["edit"] for c in resp["activations"]["z_after"]} == {"after"}
    assert all("edit" not in c for c in resp["activations"]["layers.2.residual"])
    assert before[[0, 2]].any()
    assert not after[[0, 2]].any()
    np.testing.assert_array_equal(after[[1, 3]], before[[1, 3]])
    np.testing.assert_allclose(hook_rows(resp, "layers.2.residual"), python_rows(steps, "layers.2.residual"), atol=ATOL)


# ----------------------------------------------------------------------------- (b) no edits


def test_an_empty_intervention_list_changes_nothing(http):
    plain = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(activation_hooks=[HOOK])))
    empty = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(activation_hooks=[HOOK], interventions=[])))
    assert empty["interventions"] == []
    assert empty["generated_token_ids"] == plain["generated_token_ids"]
    np.testing.assert_array_equal(hook_rows(empty, "layers.2.residual"), hook_rows(plain, "layers.2.residual"))
    a = ok(http("POST", "/v1/chat/completions", json=chat_body()))
    b = ok(http("POST", "/v1/chat/completions", json=chat_body(interventions=[])))
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


# ----------------------------------------------------------------------------- (c) stored captures as sources


def test_patching_a_capture_into_its_own_prompt_changes_nothing(http, llama_kit):
    hooks = [{"layer_name": 1, "component": "residual"}, {"layer_name": 1, "component": "z", "hook_id": "my_z"}, HOOK]
    first = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(activation_hooks=hooks, activation_format="none")))
    capture_id = first["capture_id"]
    patch = [
        {"layer_name": 1, "component": "residual", "op": "patch", "capture_id": capture_id},
        {"layer_name": 1, "component": "z", "op": "patch", "capture_id": capture_id, "capture_hook": "my_z", "heads": [1, 3]},
    ]
    again = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(activation_hooks=[HOOK], interventions=patch)))
    assert again["generated_token_ids"] == first["generated_token_ids"]
    # Every position that passed through the model: the prompt, then each generated token but the last.
    n_positions = len(first["prompt_token_ids"]) + len(first["generated_token_ids"]) - 1
    assert [a["source_positions"] for a in again["interventions"]] == [[0, n_positions]] * 2
    assert again["interventions"][1]["capture_hook"] == "my_z" and again["interventions"][0]["capture_id"] == capture_id
    plain_tokens, steps = python_run(llama_kit, None)
    assert again["generated_token_ids"] == plain_tokens
    np.testing.assert_allclose(hook_rows(again, "layers.2.residual"), python_rows(steps, "layers.2.residual"), atol=ATOL)


def test_mean_ablation_from_a_stored_capture_equals_the_python_api(http, llama_kit):
    # A capture of another prompt, read back through the store, averaged over its positions.
    other = ok(http("POST", "/v1/chat/completions/with_activations", json={
        "messages": [{"role": "user", "content": "class Decoder(object): pass"}], "max_tokens": 4, "temperature": 0,
        "activation_hooks": [{"layer_name": 1, "component": "mlp"}], "activation_format": "base64",
    }))
    mean = hook_rows(other, "layers.1.mlp").mean(axis=0, dtype=np.float64).astype(np.float32)
    by_id = [{"layer_name": 1, "component": "mlp", "op": "mean", "capture_id": other["capture_id"], "indices": list(range(0, 64, 2))}]
    tokens, steps = python_run(llama_kit, [{**by_id[0], "capture_id": None, "values": mean}])
    resp = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(activation_hooks=[HOOK], interventions=by_id)))
    assert resp["generated_token_ids"] == tokens
    np.testing.assert_allclose(hook_rows(resp, "layers.2.residual"), python_rows(steps, "layers.2.residual"), atol=ATOL)
    # Downloaded captures record the edits they were taken under.
    from mlx_engine.wire.files import safetensors_to_captures

    _, meta = safetensors_to_captures(ok_bytes(http("GET", f"/v1/activations/captures/{resp['capture_id']}")))
    assert json.loads(meta["interventions"])[0]["capture_id"] == other["capture_id"]


def ok_bytes(response: requests.Response) -> bytes:
    assert response.status_code == 200, response.text
    return response.content


# ----------------------------------------------------------------------------- (d) steering vectors


def test_steering_vector_endpoint_equals_the_python_helper(http, llama_kit):
    positive = ["x = [1, 2, 3, 4]\n", "return 42"]
    negative = ["def name(self):\n", mlx_engine.tokenize(llama_kit, "pass")]
    expected = mlx_engine.steering_vector(llama_kit, positive, negative, "model.layers.1")
    body = {"layer_name": "model.layers.1", "positive": positive, "negative": negative}
    as_json = ok(http("POST", "/v1/steering/vectors", json=body))
    as_b64 = ok(http("POST", "/v1/steering/vectors", json={**body, "format": "base64"}))
    want = np.array(expected.vector)
    for resp, encoding in ((as_json, "json"), (as_b64, "base64")):
        assert resp["vector"]["encoding"] == encoding and resp["vector"]["shape"] == [llama_kit.arch_info.d_model]
        np.testing.assert_allclose(decode_capture(resp["vector"]), want, rtol=0, atol=1e-6)
        assert resp["norm"] == pytest.approx(expected.norm, rel=1e-6)
        assert (resp["hook_id"], resp["layer_name"], resp["layer"], resp["n_positive"], resp["n_negative"]) == ("layers.1.residual", "layers.1", 1, 2, 2)

    last = ok(http("POST", "/v1/steering/vectors", json={**body, "position": "last", "drop_bos": False}))
    want_last = mlx_engine.steering_vector(llama_kit, positive, negative, 1, last_token_only=True, drop_bos=False)
    np.testing.assert_allclose(decode_capture(last["vector"]), np.array(want_last.vector), rtol=0, atol=1e-6)

    # The ready-made intervention goes straight back in (either encoding), with a scale.
    tokens, _ = python_run(llama_kit, [expected.intervention(scale=6.0)])
    for resp in (as_json, as_b64):
        sent = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(
            activation_hooks=[HOOK], activation_format="none", interventions=[{**resp["intervention"], "scale": 6.0}])))
        assert sent["generated_token_ids"] == tokens

    bad = http("POST", "/v1/steering/vectors", json={**body, "layer_name": 7})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "layer_name" and "out of range" in bad.json()["error"]["message"]
    bad = http("POST", "/v1/steering/vectors", json={**body, "positive": [[1, 10**6]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "positive[0]"


# ----------------------------------------------------------------------------- (e) validation


def bad_cases(kit, capture_id: str) -> list[tuple[dict[str, Any], str, str]]:
    """(intervention, message pattern, param field) against the tiny Llama: 3 layers, d_model 64, 4 heads, 2 kv heads, head_dim 16."""
    d = kit.arch_info.d_model
    zeros = np.zeros(d, np.float32)
    return [
        ({"layer_name": 1, "component": "residual", "op": "add", "vector": [0.5] * (d - 1)}, r"vector for layers.1.residual must have shape \[64\], got \[63\]", "vector"),
        ({"layer_name": "decoder.x", "component": "residual", "op": "zero"}, r"Unknown layer name 'decoder.x'; valid layer names: 0..2", "layer_name"),
        ({"layer_name": 3, "component": "residual", "op": "zero"}, r"Layer 3 is out of range: this model has 3 layers \(0..2\)", "layer_name"),
        ({"layer_name": 1, "component": "resid", "op": "zero"}, r"component: Input should be 'embedding', 'residual'", "component"),
        ({"layer_name": 1, "component": "attention_pattern", "op": "zero"}, r"component: Input should be", "component"),
        ({"layer_name": 1, "component": "residual", "op": "multiply"}, r"op: Input should be 'add', 'zero', 'mean', 'clamp', 'scale', 'patch' or 'topk'", "op"),
        ({"layer_name": 1, "component": "mlp", "op": "zero", "indices": [3, 64]}, r"index 64 is out of range: layers.1.mlp has 64 features per position \(0..63\)", "indices"),
        ({"layer_name": 1, "component": "z", "op": "zero", "heads": [4]}, r"head 4 is out of range: layers.1.z has 4 heads \(0..3\)", "heads"),
        ({"layer_name": 1, "component": "key", "op": "zero", "heads": [2]}, r"head 2 is out of range: layers.1.key has 2 heads \(0..1\)", "heads"),
        ({"layer_name": 1, "component": "residual", "op": "zero", "heads": [0]}, r"'heads' applies to query, key, value and z; layers.1.residual has no head axis", "heads"),
        ({"layer_name": 1, "component": "residual", "op": "zero", "positions": "later"}, r"positions: Input should be 'all', 'prompt' or 'generated'", "positions"),
        ({"layer_name": 1, "component": "residual", "op": "zero", "positions": [0, 999]}, r"position 999 is out of range: this run passes positions 0..\d+ through the model", "positions"),
        ({"layer_name": 1, "component": "residual", "op": "patch", "capture_id": "cap-missing"}, r"no stored capture 'cap-missing'", "capture_id"),
        ({"layer_name": 1, "component": "residual", "op": "patch", "capture_id": capture_id, "capture_hook": "nope"}, r"holds no hook 'nope'; it holds: layers.0.mlp", "capture_hook"),
        ({"layer_name": 1, "component": "residual", "op": "mean", "capture_id": capture_id}, r"the source has no capture 'layers.1.residual'; it holds: layers.0.mlp", "capture_id"),
        ({"layer_name": 1, "component": "residual", "op": "zero", "capture_hook": "x"}, r"'capture_hook' names a hook inside a stored capture; give 'capture_id' too", "capture_hook"),
        ({"layer_name": 1, "component": "residual", "op": "clamp", "min": 2, "max": 1}, r"'min' \(2.0\) is greater than 'max' \(1.0\)", "min"),
        ({"layer_name": 1, "component": "residual", "op": "add", "vector": {**b64(zeros), "shape": [d + 1]}}, r"base64 data holds 256 bytes; shape \[65\] of float32 needs 260", "vector"),
        ({"layer_name": 1, "component": "residual", "op": "add", "vector": b64(zeros[:32])}, r"vector for layers.1.residual must have shape \[64\], got \[32\]", "vector"),
        ({"layer_name": 1, "component": "residual", "op": "add", "vector": {"data": "not base64!", "shape": [d]}}, r"'data' is not valid base64", "vector"),
        ({"layer_name": 1, "component": "residual", "op": "add"}, r"op 'add' needs 'vector'", "vector"),
        ({"layer_name": 1, "component": "residual", "op": "add", "vector": [1.0, "x"]}, r"vector\[1\]: Input should be a valid number", "vector[1]"),
        ({"layer_name": 1, "component": "residual", "op": "scale"}, r"op 'scale' needs 'scale'", "scale"),
        ({"layer_name": 1, "component": "residual", "op": "add", "vector": [0.0] * d, "min": 1}, r"field does not apply to op 'add' 'min'", "min"),
        ({"layer_name": 1, "component": "residual", "op": "patch", "values": [[0.0] * 32] * 3}, r"the patch source for layers.1.residual must have shape \[T, 64\], got \[3, 32\]", "values"),
        ({"layer_name": 1, "component": "residual", "op": "zero", "colour": "red"}, r"colour: Extra inputs are not permitted", "colour"),
    ]


def test_bad_interventions_are_refused_before_generating(http, llama_kit):
    source = ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(
        max_tokens=2, activation_hooks=[{"layer_name": 0, "component": "mlp"}], activation_format="none")))
    cases = bad_cases(llama_kit, source["capture_id"])
    completed = http("GET", "/health").json()["engine"]["completed_generations"]
    for path in ("/v1/chat/completions", "/v1/chat/completions/with_activations", "/v1/completions"):
        base = {"prompt": PROMPT, "max_tokens": 4} if path == "/v1/completions" else chat_body(max_tokens=4)
        if path.endswith("with_activations"):
            base["activation_hooks"] = [HOOK]
        for intervention, message, field in cases:
            good = {"layer_name": 0, "component": "mlp", "op": "scale", "scale": 2.0}
            r = http("POST", path, json={**base, "interventions": [good, intervention]})
            assert r.status_code == 400, (path, intervention, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_intervention", (intervention, error)
            assert error["type"] == "invalid_request_error"
            assert error["param"] == f"interventions[1].{field}", (intervention, error)
            assert re.search(message, error["message"]), (intervention, error["message"])
    assert http("GET", "/health").json()["engine"]["completed_generations"] == completed, "nothing may generate"
    # Streaming requests are refused the same way, with a status, before any event.
    r = http("POST", "/v1/chat/completions", json=chat_body(stream=True, interventions=[cases[0][0]]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_intervention"
    # Nested lists deeper than a position's rows are refused by their type.
    r = http("POST", "/v1/chat/completions", json=chat_body(interventions=[{"layer_name": 1, "op": "add", "component": "residual", "vector": [[[[0.0]]]]}]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_intervention"
    # And the server goes on serving.
    assert ok(http("POST", "/v1/chat/completions", json=chat_body(interventions=[{"layer_name": 0, "component": "mlp", "op": "scale", "scale": 2.0}])))["choices"]


# ----------------------------------------------------------------------------- (f) streaming


def test_streaming_with_interventions(server, http, llama_kit):
    v = steer_vector(llama_kit, seed=1)
    steer = [{"layer_name": 1, "component": "residual", "op": "add", "vector": b64(v), "scale": 8.0, "positions": "generated"}]
    tokens, steps = python_run(llama_kit, [{**steer[0], "vector": v}])

    chunks = sse(server, "/v1/chat/completions/with_activations", chat_body(activation_hooks=[HOOK], activation_format="json", interventions=steer))
    first, *middle, last = chunks
    assert first["interventions"][0]["positions"] == "generated"
    steps_chunks = [c for c in middle if "token_id" in c]
    assert [c["token_id"] for c in steps_chunks] == tokens
    streamed = np.concatenate([decode_capture(c["activations"]["layers.2.residual"][0]) for c in steps_chunks])
    np.testing.assert_allclose(streamed, python_rows(steps, "layers.2.residual"), atol=ATOL)
    assert last["choices"][0]["finish_reason"] == "length"

    text = "".join(r.text for r, _ in steps)
    plain_chunks = sse(server, "/v1/chat/completions", chat_body(interventions=steer))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in plain_chunks if c["choices"]) == text
    assert plain_chunks[0]["interventions"][0]["op"] == "add"

    ids = mlx_engine.tokenize(llama_kit, PROMPT)
    expected = "".join(r.text for r in mlx_engine.create_generator(llama_kit, ids, max_tokens=MAX_TOKENS, temp=0.0, interventions=[{**steer[0], "vector": v}]))
    done = sse(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "interventions": steer})
    assert "".join(c["choices"][0]["text"] for c in done if c["choices"]) == expected
    assert done[0]["interventions"][0]["scale"] == 8.0 and all("interventions" not in c for c in done[1:])


# ----------------------------------------------------------------------------- the document


def test_openapi_documents_interventions_and_real_responses_match(server, http, llama_kit):
    import jsonschema
    from openapi_spec_validator import validate

    doc = ok(http("GET", "/openapi.json"))
    validate(doc)
    assert "post" in doc["paths"]["/v1/steering/vectors"]
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest", "ActivationChatRequest"):
        assert schemas[name]["properties"]["interventions"]["anyOf"][0]["items"]["$ref"].endswith("/Intervention")
    assert "edit" in schemas["CaptureHookSpec"]["properties"]

    def check(instance: Any, name: str) -> None:
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}, cls=jsonschema.Draft202012Validator)

    v = steer_vector(llama_kit)
    steer = [{"layer_name": 1, "component": "residual", "op": "add", "vector": v.tolist(), "scale": 2.0}]
    hooks = [{"layer_name": 1, "component": "residual", "edit": "before"}]
    check(ok(http("POST", "/v1/chat/completions/with_activations", json=chat_body(max_tokens=2, activation_hooks=hooks, interventions=steer))), "ChatCompletion")
    for chunk in sse(server, "/v1/chat/completions", chat_body(max_tokens=2, interventions=steer)):
        check(chunk, "ChatCompletionChunk")
    check(ok(http("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "interventions": steer})), "Completion")
    check(ok(http("POST", "/v1/steering/vectors", json={"layer_name": 1, "positive": ["a"], "negative": ["b"]})), "SteeringVectorResponse")
    check(http("POST", "/v1/chat/completions", json=chat_body(interventions=[{"op": "zero"}])).json(), "ErrorResponse")


# ----------------------------------------------------------------------------- the wire forms, without a server


def test_wire_arrays_decode_as_the_activation_encoding_sends_them():
    import mlx.core as mx
    from pydantic import ValidationError

    from mlx_engine.server.errors import to_error
    from mlx_engine.server.intervention_sources import decode_wire_array
    from mlx_engine.server.schemas.hooks_and_edits import Intervention
    from mlx_engine.hooks.capture import mlx_to_numpy
    from mlx_engine.wire.codec import encode_array
    from mlx_engine.interventions import InterventionError

    values = mx.array(np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4))
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        for fmt in ("base64", "json"):
            raw, name = mlx_to_numpy(values.astype(dtype))
            wire = encode_array(raw, fmt, name)  # {shape, dtype, data}, as captures travel
            item = Intervention.model_validate_json(json.dumps({"layer_name": 0, "op": "patch", "values": {**wire, "encoding": fmt}}))
            np.testing.assert_array_equal(decode_wire_array(item.values, 0, "values"), np.array(values.astype(dtype).astype(mx.float32)))
    with pytest.raises(ValidationError, match="encoding is 'json' but data is a string"):
        Intervention.model_validate_json(json.dumps({"layer_name": 0, "op": "patch", "values": {"shape": [1], "encoding": "json", "data": "AAAAAA=="}}))
    status, body = to_error(InterventionError("interventions[0].heads: head 9 is out of range.", param="interventions[0].heads"))
    assert status == 400 and body["error"] == {
        "message": "interventions[0].heads: head 9 is out of range.", "type": "invalid_request_error",
        "param": "interventions[0].heads", "code": "invalid_intervention",
    }
