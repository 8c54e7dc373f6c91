"""SAEs over HTTP on a real server (the embedded default model, ephemeral port): attach, list, detach,
capture and edit features with `"sae": id`.

What is proven, on an SAE trained here on the model's own layer-1 residuals:
  - streamed chat with the SAE's top-k features and the layer-1 residual in each chunk: the
    feature ids and values equal `sae.encode` of that chunk's residual, computed in the test
    (|diff| <= 1e-5 * (1 + |value|), as tests/test_sae_attach.py), largest first;
  - attached, unedited, it changes nothing: the same greedy tokens as before attaching;
  - an intervention `{"sae": id, "op": "clamp", ...}` sets the feature to the value in the
    captured features (`edit: "after"`), leaves the `"before"` capture alone, and changes the
    downstream residual;
  - the SAE shows in GET .../saes, GET .../hook_points and mlx_engine.hooks.listing; it goes away on
    DELETE; only folders under --sae-root load, Hub ids are refused with --no-hub, and bad
    requests get OpenAI-style 4xx bodies naming the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np
import pytest
import requests
from neuroscope_server import running_server

from mlx_engine.hooks.listing import describe_hook_points
from mlx_engine.sae import load_sae, train
from mlx_engine.wire.codec import decode_capture, decode_capture_extras

TEXTS = [f"Sentence {i}: the {w} sat on the mat while {v} ran past the old stone wall." for i, (w, v) in
         enumerate([("cat", "a dog"), ("owl", "the fox"), ("king", "his horse"), ("robot", "a child"), ("crow", "rain")] * 3)]
SAE_ID = "layers.1.residual.sae_features"
CHAT = {"messages": [{"role": "user", "content": "Once upon a time the little robot"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def sae_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kit = mlx_engine.load_model("default")
    rows = np.concatenate([np.array(mlx_engine.run_with_cache(kit, t, ["layers.1.residual"])["layers.1.residual"]) for t in TEXTS])
    root = tmp_path_factory.mktemp("saes")
    train(rows, "blocks.1.hook_resid_post", 128, root / "resid1", architecture="topk", k=8, batch_size=64, tokens=40 * 64,
          lr=1e-3, progress=False, eval_tokens=64)
    return root


@pytest.fixture(scope="module")
def url(sae_root: Path) -> Iterator[str]:
    with running_server(sae_roots=(sae_root,), allow_hub_models=False) as base:
        yield base


def attach(url: str, **body: Any) -> requests.Response:
    return requests.post(f"{url}/v1/models/default/saes", json={"source": "resid1", **body}, timeout=120)


def detach(url: str) -> requests.Response:
    return requests.delete(f"{url}/v1/models/default/saes/{SAE_ID}", timeout=120)


def stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with requests.post(f"{url}/v1/chat/completions/with_activations", json={**body, "stream": True}, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.all(np.abs(got - want) <= 1e-5 * (1 + np.abs(want))))


def test_streamed_top_k_features_equal_encode_of_the_streamed_residual(url: str, sae_root: Path) -> None:
    plain = requests.post(f"{url}/v1/chat/completions", json=CHAT, timeout=300).json()
    answer = attach(url, top_k=6)
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == SAE_ID and answer.json()["d_sae"] == 128
    try:
        chunks = stream(url, {**CHAT, "activation_format": "base64", "activation_hooks": [{"sae": SAE_ID}, "layers.1.residual"]})
        same = requests.post(f"{url}/v1/chat/completions", json=CHAT, timeout=300).json()
    finally:
        assert detach(url).status_code == 200
    assert same["choices"][0]["message"] == plain["choices"][0]["message"]
    sae = load_sae(sae_root / "resid1")
    steps = 0
    for chunk in chunks:
        acts = chunk.get("activations") or {}
        if not acts:
            continue
        (resid,), (top,) = acts["layers.1.residual"], acts[SAE_ID]
        assert top["component"] == "sae_features" and top["positions"] == resid["positions"] and top["dtype"] == "uint32"
        dense = np.array(sae.encode(mx.array(decode_capture(resid))))
        ids, values = decode_capture(top).astype(np.int64), decode_capture_extras(top)["values"]
        assert ids.shape == values.shape == (dense.shape[0], 6)
        assert close(values, -np.sort(-dense, axis=-1)[:, :6]) and close(np.take_along_axis(dense, ids, axis=-1), values)
        steps += 1
    assert steps == CHAT["max_tokens"]


def test_feature_interventions_by_sae_id(url: str) -> None:
    assert attach(url).status_code == 200
    try:
        hooks = [{"sae": SAE_ID, "edit": "before", "hook_id": "before"}, {"sae": SAE_ID, "hook_id": "after"}, "layers.3.residual"]
        body = {**CHAT, "max_tokens": 1, "activation_hooks": hooks, "activation_format": "json"}
        clamp = [{"sae": SAE_ID, "op": "clamp", "indices": [5], "min": 7.5, "max": 7.5}]
        edited = requests.post(f"{url}/v1/chat/completions/with_activations", json={**body, "interventions": clamp}, timeout=300).json()
        plain = requests.post(f"{url}/v1/chat/completions/with_activations", json=body, timeout=300).json()
    finally:
        detach(url)
    after = np.asarray(edited["activations"]["after"][0]["data"])
    before = np.asarray(edited["activations"]["before"][0]["data"])
    assert np.all(after[:, 5] == 7.5) and np.array_equal(before, np.asarray(plain["activations"]["before"][0]["data"]))
    assert not np.allclose(edited["activations"]["layers.3.residual"][0]["data"], plain["activations"]["layers.3.residual"][0]["data"])


def test_attached_saes_are_listed_everywhere_and_detach(url: str, sae_root: Path) -> None:
    assert requests.get(f"{url}/v1/models/default/saes", timeout=30).json()["data"] == []
    assert attach(url, top_k=4).status_code == 200
    listed = requests.get(f"{url}/v1/models/default/saes", timeout=30).json()["data"]
    points = requests.get(f"{url}/v1/models/default/hook_points", timeout=30).json()["saes"]
    assert [s["hook_id"] for s in listed] == [s["hook_id"] for s in points] == [SAE_ID]
    assert listed[0]["site"] == "layers.1.residual" and listed[0]["shape"] == ["T", 4]
    again = attach(url)
    assert again.status_code == 400 and "already attached" in again.json()["error"]["message"]
    assert detach(url).json()["data"] == []
    assert requests.get(f"{url}/v1/models/default/hook_points", timeout=30).json()["saes"] == []
    kit = mlx_engine.load_model("default")
    handle = mlx_engine.attach_sae(kit, load_sae(sae_root / "resid1"))
    assert [s["hook_id"] for s in describe_hook_points(kit)["saes"]] == [SAE_ID]
    handle.detach()
    assert describe_hook_points(kit)["saes"] == []


@pytest.mark.parametrize("method, path, body, status, needle", [
    ("post", "/v1/models/default/saes", {"source": "missing"}, 404, "No SAE folder 'missing'"),
    ("post", "/v1/models/default/saes", {"source": "../resid1"}, 403, "'..'"),
    ("post", "/v1/models/default/saes", {"source": "/etc"}, 403, "inside an --sae-root"),
    ("post", "/v1/models/default/saes", {"source": "owner/some-sae"}, 404, "No SAE folder"),  # --no-hub
    ("post", "/v1/models/default/saes", {"source": "resid1", "hook": "layers.1.attention_pattern"}, 400, "cannot be attached"),
    ("post", "/v1/models/default/saes", {"source": "resid1", "hook": "layers.1.mlp_post"}, 400, "'mlp_post' is not offered"),
    ("post", "/v1/models/default/saes", {"source": "resid1", "top_k": 0}, 400, "top_k"),
    ("post", "/v1/models/nope/saes", {"source": "resid1"}, 404, "nope"),
    ("delete", f"/v1/models/default/saes/{SAE_ID}", None, 404, "No SAE"),
    ("post", "/v1/chat/completions/with_activations", {**CHAT, "activation_hooks": [{"sae": SAE_ID}]}, 400, f"Unknown hook name {SAE_ID!r}"),  # none attached
    ("post", "/v1/chat/completions/with_activations", {**CHAT, "activation_hooks": [{"sae": SAE_ID, "layer_name": 1}]}, 400, "not both"),
    ("post", "/v1/chat/completions", {**CHAT, "interventions": [{"sae": SAE_ID, "op": "zero", "component": "residual"}]}, 400, "sae_features"),
])
def test_bad_requests_are_4xx_with_a_reason(url: str, sae_root: Path, method: str, path: str, body: Any, status: int, needle: str) -> None:
    answer = getattr(requests, method)(f"{url}{path}", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert needle in error["message"] and str(sae_root) not in answer.text
