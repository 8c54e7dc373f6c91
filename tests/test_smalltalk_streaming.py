"""`generateWithActivations:hooks:onStep:`: streamed over SSE in Amber (run on Node against a real
server) and Pharo (its exact request sent to a real server and read line by line as the Pharo
method reads it); Squeak replays the steps from a whole response, and says so.

Equality with the whole (non-streamed) response is exact: the same greedy generation, the
same float32 numbers through JSON.
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

from mlx_engine.integrations.neuroscope.endpoints import endpoint
from mlx_engine.integrations.neuroscope.format import convert_activations_for_neuroscope
from mlx_engine.integrations.neuroscope.smalltalk import generate_smalltalk_client
from mlx_engine.integrations.neuroscope.smalltalk_source import read_file_in
from mlx_engine.integrations.neuroscope.smalltalk_streaming import SELECTOR, STEP_KEYS, streaming_request

HOOKS = ["layers.0.residual", "layers.1.attention_pattern"]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_server() as url:
        yield url


@pytest.fixture(scope="module")
def amber_source(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("amber") / "neuroscope-client.st"
    path.write_text(generate_smalltalk_client("amber", base_url), encoding="utf-8")
    return path


def post(base_url: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def whole_response(base_url: str) -> dict[str, Any]:
    """The same request as onStep: sends, without stream: what the assembled answer must equal."""
    request = streaming_request("squeak", ["Hello", HOOKS], None)
    status, raw = post(base_url, request.path, request.body)
    assert status == 200, raw
    return json.loads(raw)


def steps_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    """Per generated token: its id, text and that step's captures converted (what the block must get)."""
    converted = convert_activations_for_neuroscope(response)["activations"]
    return [
        {"step": k, "tokenId": token_id, "token": token,
         "activations": {hook: [e for e in entries if e["step"] == k] for hook, entries in converted.items()}}
        for k, (token_id, token) in enumerate(zip(response["generated_token_ids"], response["generated_tokens_text"]))
    ]


def test_amber_streams_each_step_to_the_block_and_answers_the_whole_response(base_url: str, amber_source: Path) -> None:
    expression = (
        "| client steps | client := NeuroScopeMLXClient default. steps := Array new. "
        f"(client generateWithActivations: 'Hello' hooks: #('{HOOKS[0]}' '{HOOKS[1]}') onStep: [ :step | steps add: step ]) "
        "then: [ :response | Dictionary new at: 'steps' put: steps; at: 'response' put: response; yourself ]"
    )
    status, summary, output = amber_eval([amber_source], expression)
    assert status == 0, output
    got, want = summary["value"], whole_response(base_url)
    assert len(want["generated_token_ids"]) >= 2
    for step, expected in zip(got["steps"], steps_of(want), strict=True):
        assert set(step) == set(STEP_KEYS)
        assert {k: step[k] for k in ("step", "tokenId", "token", "activations")} == expected
    response = got["response"]
    for key in ("model", "prompt_token_ids", "prompt_tokens_text", "generated_token_ids", "generated_tokens_text"):
        assert response[key] == want[key], key
    assert response["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert response["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    assert convert_activations_for_neuroscope(response) == convert_activations_for_neuroscope(want)


def test_amber_stream_errors_carry_the_servers_message(amber_source: Path) -> None:
    expression = (
        "(NeuroScopeMLXClient default generateWithActivations: 'Hi' hooks: #('layers.999.residual') onStep: [ :step | ]) "
        "then: [ :response | 'no error' ]"
    )
    status, summary, output = amber_eval([amber_source], expression)
    assert status == 1, output
    assert "mlx-engine HTTP 400" in summary["error"] and "out of range" in summary["error"], output


def pharo_lines(raw: bytes) -> list[str]:
    """The lines the Pharo method hands absorbEventLine:, read as it reads them (up to each LF)."""
    text = raw.decode("utf-8")
    lines = text.split("\n")
    return lines[:-1] + ([lines[-1]] if lines[-1] else [])


def test_the_pharo_request_streams_events_the_shared_source_reads(base_url: str) -> None:
    request = streaming_request("pharo", ["Hello", HOOKS], None)
    assert request.body["stream"] is True and request.path == endpoint("generate_with_activations").path
    status, raw = post(base_url, request.path, request.body)
    assert status == 200, raw
    chunks = [json.loads(line[6:]) for line in pharo_lines(raw) if line.startswith("data: ") and line[6:] != "[DONE]"]
    assert pharo_lines(raw)[-2:] == ["data: [DONE]", ""]
    steps = [c for c in chunks if "token_id" in c]
    want = whole_response(base_url)
    assert [c["token_id"] for c in steps] == want["generated_token_ids"]
    assert [c["token_text"] for c in steps] == want["generated_tokens_text"]
    assert chunks[0]["prompt_token_ids"] == want["prompt_token_ids"]
    assert all(c["choices"] and "delta" in c["choices"][0] for c in chunks)
    streamed = {hook: [cap for c in steps for cap in c["activations"][hook]] for hook in HOOKS}
    assert convert_activations_for_neuroscope({**want, "activations": streamed}) == convert_activations_for_neuroscope(want)


@pytest.mark.parametrize("dialect, stream", [("pharo", "true"), ("amber", "true"), ("squeak", "false")])
def test_each_dialect_sends_the_stream_flag_the_contract_says(dialect: str, stream: str) -> None:
    methods = {m.selector: m.source for m in read_file_in(generate_smalltalk_client(dialect)).methods}
    assert "body at: 'stream' put: true." in methods[SELECTOR]
    body = streaming_request(dialect, ["x", []], None).body
    written = [line.split("'")[1] for line in methods[SELECTOR].splitlines() if line.strip().startswith("body at: '")]
    assert sorted(written) == sorted(set(body) - {"model"}), "the method writes the fields the contract sends"
    assert "model isNil ifFalse: [ body at: 'model' put: model ]." in methods[SELECTOR]
    transport = methods["streamChat:onStep:"]
    assert streaming_request(dialect, ["x", []], None).body["stream"] is (stream == "true")
    if dialect == "squeak":
        assert "body: aDictionary" in transport and "aDictionary at: 'stream' put: false." in transport
        assert "Transcript show:" in transport and "does not stream" in transport
        assert "replaySteps:" in transport
    elif dialect == "pharo":
        assert "streaming: true" in transport and "ZnCharacterReadStream" in transport
    else:
        assert "getReader" in transport and "TextDecoder" in transport
