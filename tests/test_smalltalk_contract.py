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
from urllib.parse import quote, urlencode

import pytest

from neuroscope_server import NON_ASCII_STORE, research_roots, running_server

from mlx_engine.integrations.neuroscope.endpoints import ENDPOINTS, Endpoint, endpoint
from mlx_engine.integrations.neuroscope.smalltalk import generate_smalltalk_client
from mlx_engine.integrations.neuroscope.smalltalk_requests import url_encode, body_plan, selector_arity, smalltalk_request
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
    "bins": 8,
    "top": 3,
    "documents": [f"Document {i}: the cat sat on the mat." for i in range(4)],
    "context_size": 32,
    "batch_size": 2,
    "layer_name": 1,
    "positive": ["I love this."],
    "negative": ["I hate this."],
}
# Where an endpoint needs other values than the shared ones (an extraction stores residuals only).
ENDPOINT_ARGUMENTS: dict[str, dict[str, Any]] = {"start_extraction": {"hooks": ["layers.1.residual"]}}
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
    stores, saes = research_roots(tmp_path_factory.mktemp("research"))
    with running_server(store_root=stores, sae_roots=(saes,)) as url:
        yield url


def start_job(base_url: str) -> str:
    """A job for the progress and cancel requests: long enough that a cancel finds it running."""
    body = {"documents": ARGUMENTS["documents"] * 500, "hooks": ["layers.1.residual"], "context_size": 32, "batch_size": 1}
    status, job = send(base_url, "POST", "/v1/extract", body)
    assert status == 200, job
    return job["id"]


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
    given = {**ARGUMENTS, **ENDPOINT_ARGUMENTS.get(ep.name, {})}
    if "job_id" in ep.smalltalk.args:
        given["job_id"] = start_job(base_url)
    arguments = [given[name] for name in ep.smalltalk.args[: selector_arity(ep, selector)]]
    request = smalltalk_request(ep, selector, arguments, model)
    status, answer = send(base_url, request.method, request.path, request.body)
    assert 200 <= status < 300, f"{selector} sent {request} and got {status}: {answer}"
    assert isinstance(answer, dict) and set(ep.reads) <= set(answer), f"{selector}: {sorted(answer)} lacks {ep.reads}"
    if ep.name in ("generate_with_activations", "complete_with_activations"):
        steps = request.body["max_tokens"]
        assert len(answer["generated_token_ids"]) == steps
        assert set(answer["activations"]) == {"layers.0.residual", "layers.1.attention_pattern"}
    if "job_id" in ep.smalltalk.args:
        send(base_url, "DELETE", f"/v1/extract/{given['job_id']}", None)  # no job left running for the next case


# Text beyond ASCII where each kind of value travels: a path segment, a query value, an n-gram.
NON_ASCII = ["café →", "naïve 😀", "Ω\u0301", "a/b?c=d&e#f %"]


@pytest.mark.parametrize("text", NON_ASCII)
def test_theurl_encoder_sends_utf8_percent_escapes(text: str) -> None:
    """The Python mirror of urlEncode: (the Pharo and Squeak source is the same method, Amber runs it) percent-encodes
    exactly as urllib does with nothing safe but the unreserved characters."""
    assert url_encode(text) == quote(text, safe="")
    assert url_encode("\ud800x") == "%EF%BF%BDx"  # a lone surrogate has no UTF-8: U+FFFD's bytes, as the method sends


def test_non_ascii_ids_and_queries_reach_the_server_intact(base_url: str) -> None:
    """The requests storeStats:hook: and ngramNeurons:ngram: send with text beyond ASCII: the store id and the hook
    name come back as given, and the n-gram is tokenized from the very text a Python client sends."""
    stats = smalltalk_request(endpoint("store_stats"), "storeStats:hook:", [NON_ASCII_STORE, "layers.1.residual"], None)
    status, answer = send(base_url, stats.method, stats.path, None)
    assert status == 200 and answer["store"] == NON_ASCII_STORE, answer
    wrong = smalltalk_request(endpoint("store_stats"), "storeStats:hook:", ["tiny", NON_ASCII_STORE], None)
    status, answer = send(base_url, wrong.method, wrong.path, None)
    assert status == 400 and NON_ASCII_STORE in answer
    ngram = smalltalk_request(endpoint("ngram_neurons"), "ngramNeurons:ngram:", ["tiny", "café → naïve"], None)
    status, answer = send(base_url, ngram.method, ngram.path, None)
    by_hand = json.loads(urllib.request.urlopen(base_url + "/v1/stores/tiny/reverse?" + urlencode({"ngram": "café → naïve", "k": 10})).read())
    assert status == 200 and answer["ngram"] == by_hand["ngram"] and len(answer["ngram"]) > 4


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
