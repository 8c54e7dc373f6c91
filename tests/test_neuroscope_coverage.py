"""The endpoint table covers the server, and every client has every method the table lists.

- Each Flask route (method and path) is in ENDPOINTS or in NOT_FOR_CLIENTS (with its reason),
  never in both, and neither table names a route the server lacks: a new route fails here
  until it is given to the clients or said to be theirs to skip.
- The Python client has `ep.python_method`, the JS module's NeuroScopeClient `ep.js_method`, and
  each generated Smalltalk dialect the endpoint's selectors, for every endpoint.
- The store, analysis and SAE methods of the Python and the JS clients, run against a real server
  (the default model, a store under --store-root, an SAE under --sae-root), answer what the same
  request sent by hand answers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import pytest
import requests
from neuroscope_server import research_roots, running_server

import mlx_engine.integrations.neuroscope as neuroscope
from mlx_engine.integrations.neuroscope.client import NeuroScopeClient
from mlx_engine.integrations.neuroscope.endpoints import ENDPOINTS, NOT_FOR_CLIENTS
from mlx_engine.integrations.neuroscope.smalltalk import generate_smalltalk_client
from mlx_engine.server import ServerConfig, create_app
from mlx_engine.server.openapi import openapi_path

MODULE = Path(neuroscope.__file__).resolve().parent / "js" / "neuroscope-client.mjs"
PROMPT = "Once upon a time the little robot"


def server_routes() -> set[str]:
    app = create_app(ServerConfig())
    return {f"{m} {openapi_path(str(r))}" for r in app.url_map.iter_rules() for m in r.methods - {"HEAD", "OPTIONS"}}


def test_every_route_is_in_the_endpoint_table_or_said_to_be_skipped() -> None:
    routes = server_routes()
    tabled = {f"{ep.method} {ep.path}" for ep in ENDPOINTS}
    assert not tabled & set(NOT_FOR_CLIENTS), "a route is both given to the clients and skipped"
    assert routes - tabled - set(NOT_FOR_CLIENTS) == set(), "routes with no entry in endpoints.py (ENDPOINTS or NOT_FOR_CLIENTS)"
    assert (tabled | set(NOT_FOR_CLIENTS)) - routes == set(), "endpoints.py names routes the server does not have"
    assert all(NOT_FOR_CLIENTS.values())


def js_methods() -> set[str]:
    source = MODULE.read_text(encoding="utf-8")
    body = source[source.index("export class NeuroScopeClient"):]
    return set(re.findall(r"^  (?:async )?\*?([A-Za-z]\w*)\(", body, re.M))


def missing_methods(endpoints: Any, dialect: str) -> list[str]:
    """What each client lacks of `endpoints`, as 'client: method (endpoint)'."""
    python = {name for name in dir(NeuroScopeClient) if not name.startswith("_")}
    js = js_methods()
    source = generate_smalltalk_client(dialect)
    missing = []
    for ep in endpoints:
        if ep.python_method not in python:
            missing.append(f"python: {ep.python_method} ({ep.name})")
        if ep.js_method not in js:
            missing.append(f"js: {ep.js_method} ({ep.name})")
        for selector in (ep.smalltalk.selector, *ep.smalltalk.short_selectors):
            first = selector.split(":")[0] + (":" if ":" in selector else "")
            if not re.search(rf"^{re.escape(first)}", source, re.M):
                missing.append(f"{dialect}: {selector} ({ep.name})")
    return missing


@pytest.mark.parametrize("dialect", ["pharo", "squeak", "amber"])
def test_every_client_has_every_method_the_table_lists(dialect: str) -> None:
    assert missing_methods(ENDPOINTS, dialect) == []


def test_a_missing_client_method_is_caught() -> None:
    """An endpoint no client implements (its Smalltalk selector is generated, so only Python and JS can lack it)."""
    extra = dataclasses.replace(ENDPOINTS[0], name="store_projection", client_method="store_projection")
    assert missing_methods([extra], "pharo") == ["python: store_projection (store_projection)", "js: storeProjection (store_projection)"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return research_roots(tmp_path_factory.mktemp("research"))


@pytest.fixture(scope="module")
def base_url(roots: tuple[Path, Path]) -> Iterator[str]:
    with running_server(store_root=roots[0], sae_roots=(roots[1],)) as url:
        yield url


def by_hand(base_url: str) -> dict[str, Any]:
    """The answers the client methods must give, from requests built here."""
    get = lambda path, **q: requests.get(base_url + path, params=q, timeout=120).json()  # noqa: E731
    post = lambda path, body: requests.post(base_url + path, json=body, timeout=120).json()  # noqa: E731
    store = "/v1/stores/tiny"
    out = {
        "stores": get("/v1/stores")["data"],
        "stats": get(store + "/stats", hook="layers.1.residual"),
        "examples": get(store + "/top_examples", hook="layers.1.residual", neuron=2, k=3, context=8)["examples"],
        "ngram": get(store + "/reverse", ngram="#5", k=4),
        "ngrams": get(store + "/reverse", hook="layers.1.residual", neuron=2, n=2, k=3)["ngrams"],
        "lens": post("/v1/analysis/logit_lens", {"prompt": PROMPT, "top_k": 3}),
        "dla": post("/v1/analysis/attribution", {"prompt": PROMPT}),
        "heads": post("/v1/analysis/heads", {"prompt": PROMPT, "repeat_length": 6}),
    }
    out["attached"] = post("/v1/models/default/saes", {"source": "resid1", "top_k": 2})
    out["listed"] = get("/v1/models/default/saes")["data"]
    out["detached"] = requests.delete(base_url + f"/v1/models/default/saes/{out['attached']['id']}", timeout=60).json()["data"]
    return out


def test_python_client_methods_answer_what_the_server_answers(base_url: str) -> None:
    want = by_hand(base_url)
    client = NeuroScopeClient(base_url)
    assert client.list_stores() == want["stores"]
    assert client.store_stats("tiny", "layers.1.residual") == want["stats"]
    assert client.top_examples("tiny", "layers.1.residual", 2, k=3) == want["examples"]
    assert client.ngram_neurons("tiny", [5], k=4) == want["ngram"] == client.ngram_neurons("tiny", "#5", k=4)
    assert client.neuron_ngrams("tiny", "layers.1.residual", 2, n=2, k=3) == want["ngrams"]
    assert client.logit_lens(PROMPT, top_k=3) == want["lens"]
    assert client.attribution(PROMPT) == want["dla"]
    assert client.head_scores(PROMPT, repeat_length=6) == want["heads"]
    assert client.attach_sae("resid1", top_k=2) == want["attached"]
    assert client.list_saes() == want["listed"]
    assert client.detach_sae(want["attached"]["id"]) == want["detached"] == []


JS = r"""
import { NeuroScopeClient } from "MODULE_URL";
const client = new NeuroScopeClient(process.argv[2]);
const p = "Once upon a time the little robot";
const out = {
  stores: await client.listStores(),
  stats: await client.storeStats("tiny", "layers.1.residual"),
  examples: await client.topExamples("tiny", "layers.1.residual", 2, { k: 3 }),
  ngram: await client.ngramNeurons("tiny", [5], { k: 4 }),
  ngrams: await client.neuronNgrams("tiny", "layers.1.residual", 2, { n: 2, k: 3 }),
  lens: await client.logitLens(p, { topK: 3 }),
  dla: await client.attribution(p),
  heads: await client.headScores(p, { repeatLength: 6 }),
};
out.attached = await client.attachSae("resid1", { topK: 2 });
out.listed = await client.listSaes();
out.detached = await client.detachSae(out.attached.id);
console.log(JSON.stringify(out));
"""


def test_js_client_methods_answer_what_the_server_answers(base_url: str, tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is not installed; the JavaScript client cannot be tested")
    script = tmp_path / "run.mjs"
    script.write_text(JS.replace("MODULE_URL", MODULE.as_uri()), encoding="utf-8")
    done = subprocess.run([node, str(script), base_url], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    got, want = json.loads(done.stdout), by_hand(base_url)
    assert got == want


def test_the_amber_client_encodes_queries_and_calls_the_research_endpoints(base_url: str, tmp_path: Path) -> None:
    """The generated query code runs in Amber as the Python mirror (smalltalk_request) says, against the server."""
    from amber_eval import amber_eval

    from mlx_engine.integrations.neuroscope.endpoints import endpoint
    from mlx_engine.integrations.neuroscope.smalltalk_requests import smalltalk_request, url_encode

    source = tmp_path / "client.st"
    source.write_text(generate_smalltalk_client("amber", base_url), encoding="utf-8")
    _, encoded, output = amber_eval([source], "NeuroScopeMLXClient new urlEncode: 'group/a b~c%'")
    assert encoded.get("value") == "group%2Fa%20b~c%25", output
    # Beyond ASCII: UTF-8 bytes, an astral character (a surrogate pair in Amber's JavaScript strings) as one code point.
    text = "café → naïve 😀"
    _, encoded, output = amber_eval([source], f"NeuroScopeMLXClient new urlEncode: '{text}'")
    assert encoded.get("value") == quote(text, safe="") == url_encode(text), output
    sent = smalltalk_request(endpoint("top_examples"), "topExamples:hook:neuron:", ["tiny", "layers.1.residual", 2], None).path
    _, query, output = amber_eval([source], "NeuroScopeMLXClient new query: { 'hook' -> 'layers.1.residual'. 'neuron' -> 2. 'k' -> 20. 'context' -> 8. 'n' -> nil }")
    assert "/v1/stores/tiny/top_examples" + query.get("value", "") == sent, output
    _, answer, output = amber_eval([source], "(NeuroScopeMLXClient default topExamples: 'tiny' hook: 'layers.1.residual' neuron: 2 k: 3) then: [ :json | json at: 'examples' ]")
    want = requests.get(f"{base_url}/v1/stores/tiny/top_examples", params={"hook": "layers.1.residual", "neuron": 2, "k": 3}, timeout=60).json()
    assert answer.get("value") == want["examples"], output
