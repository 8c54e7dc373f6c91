"""The seed's NeuroScope session, run as written:

    client := LMStudioRESTClient default.
    client loadModel: '/path/to/model'.
    hooks := client createCircuitAnalysisHooks: 24.
    result := client generateWithActivations: messages hooks: hooks.
    activations := client convertActivationsForNeuroScope: (result at: #activations).

with the embedded default model's id and its real layer count. Amber runs it on Node
against a real server (requests go out in order; `result at: #activations` of a pending
answer is a Promise); its converted activations must equal the Python client's conversion
of the same request exactly (the same greedy run, float32 through JSON both ways). Pharo
and Squeak cannot run here: the requests their selectors send for the same snippet go to
a real server, and its answer converts to the same activations.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from amber_eval import amber_eval
from neuroscope_server import running_server

from mlx_engine.integrations.neuroscope.client import NeuroScopeClient
from mlx_engine.integrations.neuroscope.endpoints import endpoint
from mlx_engine.integrations.neuroscope.format import convert_activations_for_neuroscope
from mlx_engine.integrations.neuroscope.presets import create_hook_specs_for_circuit_analysis
from mlx_engine.integrations.neuroscope.smalltalk import generate_smalltalk_client
from mlx_engine.integrations.neuroscope.smalltalk_requests import smalltalk_request
from mlx_engine.integrations.neuroscope.smalltalk_source import read_file_in

MODEL = "default"
MESSAGE = "Hello"


def session(num_layers: int) -> str:
    """The seed's snippet with the model's id and layer count; `messages` is one user turn."""
    return (
        "| client hooks result activations messages |\n"
        f"messages := {{ Dictionary new at: 'role' put: 'user'; at: 'content' put: '{MESSAGE}'; yourself }}.\n"
        "client := LMStudioRESTClient default.\n"
        f"client loadModel: '{MODEL}'.\n"
        f"hooks := client createCircuitAnalysisHooks: {num_layers}.\n"
        "result := client generateWithActivations: messages hooks: hooks.\n"
        "activations := client convertActivationsForNeuroScope: (result at: #activations).\n"
        "activations"
    )


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_server() as url:
        yield url


@pytest.fixture(scope="module")
def num_layers(base_url: str) -> int:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=60) as response:
        (model,) = json.loads(response.read())["data"]
    assert model["id"] == MODEL
    return int(model["num_layers"])


@pytest.fixture(scope="module")
def python_activations(base_url: str, num_layers: int) -> dict[str, Any]:
    """The Python client's result for the same request (its defaults are the Smalltalk ones)."""
    client = NeuroScopeClient(base_url)
    client.load_model(MODEL)
    hooks = create_hook_specs_for_circuit_analysis(num_layers)
    result = client.generate_with_activations([{"role": "user", "content": MESSAGE}], hooks, activation_format="json")
    return convert_activations_for_neuroscope(result)["activations"]


def test_amber_runs_the_seed_session_as_written(base_url: str, num_layers: int, python_activations: dict[str, Any],
                                                tmp_path: Path) -> None:
    source = tmp_path / "client.st"
    source.write_text(generate_smalltalk_client("amber", base_url), encoding="utf-8")
    status, summary, output = amber_eval([source], session(num_layers))
    assert status == 0, output
    got = summary["value"]
    assert len(got) == 1 + 3 * num_layers and set(got) == set(python_activations)
    assert got == python_activations


def send(base_url: str, method: str, path: str, body: Any) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert 200 <= response.status < 300
        return json.loads(response.read())


@pytest.mark.parametrize("dialect", ["pharo", "squeak"])
def test_the_seed_session_requests_of_pharo_and_squeak(base_url: str, num_layers: int, dialect: str,
                                                       python_activations: dict[str, Any]) -> None:
    methods = {m.selector: m.source for m in read_file_in(generate_smalltalk_client(dialect, base_url)).methods}
    for selector in ("loadModel:", "createCircuitAnalysisHooks:", "generateWithActivations:hooks:", "convertActivationsForNeuroScope:"):
        assert selector in methods, selector
    assert "model := json at: 'id'." in methods["loadModel:"]  # the next request names the loaded model
    load = smalltalk_request(endpoint("load_model"), "loadModel:", [MODEL], None)
    model = send(base_url, load.method, load.path, load.body)["id"]
    messages = [{"role": "user", "content": MESSAGE}]
    hooks = create_hook_specs_for_circuit_analysis(num_layers)
    generate = smalltalk_request(endpoint("generate_with_activations"), "generateWithActivations:hooks:", [messages, hooks], model)
    assert generate.body["model"] == MODEL and generate.body["stream"] is False
    result = send(base_url, generate.method, generate.path, generate.body)
    assert convert_activations_for_neuroscope(result)["activations"] == python_activations
