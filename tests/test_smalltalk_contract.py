"""Contract test for the generated Smalltalk clients (Pharo and Squeak cannot run here).

For every generated endpoint method, full and short selector, the exact request it sends
(`smalltalk_request`, from the same plan the generator writes the method from) goes to a
real server with the default model, and the answer must be a 2xx with every key the
generated parsing code reads (`Endpoint.reads`).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any, Optional

import pytest
from neuroscope_server import running_server

from mlx_engine.integrations.neuroscope.endpoints import ENDPOINTS, Endpoint
from mlx_engine.integrations.neuroscope.smalltalk import generate_smalltalk_client
from mlx_engine.integrations.neuroscope.smalltalk_requests import body_plan, selector_arity, smalltalk_request
from mlx_engine.integrations.neuroscope.smalltalk_source import st_literal, st_string

# What a NeuroScope user would pass to each argument, by field name.
ARGUMENTS: dict[str, Any] = {
    "model": "default",
    "hooks": ["layers.0.residual", {"layer_name": 1, "component": "attention_pattern"}],
    "messages": "Hi",
    "activation_hooks": ["layers.0.residual", {"layer_name": 1, "component": "attention_pattern"}],
    "max_tokens": 2,
    "temperature": 0.0,
    "store_id": "tiny",
    "hook": "layers.1.residual",
    "neuron": 3,
    "k": 4,
    "ngram": "#5",
    "prompt": "Once upon a time",
    "top_k": 3,
    "target": None,
    "foil": None,
    "repeat_length": 6,
    "clean": [5, 6, 7, 8, 9],
    "corrupted": [5, 6, 40, 8, 9],
    "source": "resid1",
    "sae_id": "layers.1.residual.sae_features",
}
SAE = "/v1/models/default/saes"

CASES = [
    (ep, selector, model)
    for ep in ENDPOINTS
    for selector in (ep.smalltalk.selector, *ep.smalltalk.short_selectors)
    for model in (None, "default")
    if model is not None or "{model_id}" not in ep.path
]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default model, with a store under --store-root and an SAE under --sae-root for the research endpoints."""
    import mlx_engine
    import numpy as np
    from mlx_engine.sae import train

    kit = mlx_engine.load_model("default")
    texts = [f"Sentence {i}: the cat sat on the mat while a dog ran past." for i in range(12)]
    stores, saes = tmp_path_factory.mktemp("stores"), tmp_path_factory.mktemp("saes")
    mlx_engine.extract(kit, texts, ["layers.1.residual"], stores / "tiny", context_size=32, top_k=5, progress=False)
    rows = np.concatenate([np.array(mlx_engine.run_with_cache(kit, t, ["layers.1.residual"])["layers.1.residual"]) for t in texts])
    train(rows, "blocks.1.hook_resid_post", 64, saes / "resid1", architecture="topk", k=4, batch_size=32, tokens=20 * 32,
          lr=1e-3, progress=False, eval_tokens=32)
    with running_server(store_root=stores, sae_roots=(saes,)) as url:
        yield url


def send(base_url: str, method: str, path: str, body: Optional[dict[str, Any]]) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


@pytest.mark.parametrize("ep, selector, model", CASES, ids=[f"{s}-{m or 'nil'}" for _, s, m in CASES])
def test_each_generated_request_gets_what_the_client_reads(base_url: str, ep: Endpoint, selector: str, model: Optional[str]) -> None:
    send(base_url, "DELETE", "/v1/activations/hooks", None)  # each case starts with no registered hooks
    send(base_url, "DELETE", f"{SAE}/{ARGUMENTS['sae_id']}", None)  # ... and no SAE attached
    if ep.name in ("detach_sae", "list_saes"):
        assert send(base_url, "POST", SAE, {"source": ARGUMENTS["source"]})[0] == 200
    arguments = [ARGUMENTS[name] for name in ep.smalltalk.args[: selector_arity(ep, selector)]]
    request = smalltalk_request(ep, selector, arguments, model)
    status, answer = send(base_url, request.method, request.path, request.body)
    assert 200 <= status < 300, f"{selector} sent {request} and got {status}: {answer}"
    assert isinstance(answer, dict) and set(ep.reads) <= set(answer), f"{selector}: {sorted(answer)} lacks {ep.reads}"
    if ep.name == "generate_with_activations":
        steps = request.body["max_tokens"]
        assert len(answer["generated_token_ids"]) == steps
        assert set(answer["activations"]) == {"layers.0.residual", "layers.1.attention_pattern"}


@pytest.mark.parametrize("dialect", ["pharo", "squeak", "amber"])
def test_generated_methods_follow_the_plan(dialect: str) -> None:
    """The plan the contract test sends is the one each dialect's file writes."""
    source = generate_smalltalk_client(dialect)
    for ep in ENDPOINTS:
        assert ep.smalltalk.selector.split(":")[0] in source
        for part in body_plan(ep):
            if part.source in ("default", "no_stream"):
                assert f"body at: {st_string(part.field)} put: {st_literal(part.value)}." in source, (ep.name, part)
            elif part.source == "model":
                assert "model isNil ifFalse: [ body at: 'model' put: model ]." in source
            else:
                assert f"body at: {st_string(part.field)} put: " in source, (ep.name, part)
