"""The ES module client (js/neuroscope-client.mjs) run by Node against a real server.

Node's fetch and web streams are the browser's APIs, so this exercises the same code a
page runs; tests/test_neuroscope_browser.py runs it in headless Chromium as well.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from neuroscope_server import STORE, STORE_HOOK, research_roots, running_server

import mlx_engine.integrations.neuroscope as neuroscope
from mlx_engine.wire.codec import encode_capture
from mlx_engine.hooks.capture import Capture
from mlx_engine.integrations.neuroscope.client import NeuroScopeClient
from mlx_engine.integrations.neuroscope.endpoints import JS_BEGIN, JS_END, endpoints_js

MODULE = Path(neuroscope.__file__).resolve().parent / "js" / "neuroscope-client.mjs"

SCRIPT = r"""
import { NeuroScopeClient, NeuroScopeError, decodeCapture } from "MODULE_URL";
const [baseUrl, wireFile] = process.argv.slice(2);
const fs = await import("node:fs");
const out = {};
const plain = (a) => (a === null ? null : Array.from(a, (v) => (typeof v === "bigint" ? Number(v) : Number.isFinite(v) ? v : String(v))));
out.decoded = JSON.parse(fs.readFileSync(wireFile, "utf8")).map((w) => {
  const c = decodeCapture(w);
  return { array: plain(c.array), extras: Object.fromEntries(Object.entries(c.extras).map(([k, v]) => [k, plain(v)])) };
});
const client = new NeuroScopeClient(baseUrl + "/");
out.health = (await client.health()).status;
out.loaded = (await client.loadModel("default")).id;
const points = await client.hookPoints();
out.numLayers = points.num_layers;
const hooks = ["layers.0.residual", { layer_name: "layers.1", component: "attention_scores" }];
out.registered = (await client.registerHooks(hooks)).map((h) => h.hook_id);
out.cleared = (await client.clearHooks()).length;
try {
  await client.registerHooks(["layers.42.residual"]);
  out.error = null;
} catch (e) {
  out.error = { isNeuroScopeError: e instanceof NeuroScopeError, status: e.status, message: e.serverMessage, code: e.code };
}
const whole = await client.generateWithActivations("Hi", hooks, { maxTokens: 2, temperature: 0 });
out.whole = {
  tokens: whole.tokens,
  captures: Object.fromEntries(Object.entries(whole.captures).map(([h, cs]) => [h, cs.map((c) => ({ step: c.step, shape: c.shape, array: plain(c.array) }))])),
};
const streamed = [];
for await (const event of client.streamWithActivations("Hi", hooks, { maxTokens: 2, temperature: 0, activationFormat: "json" })) {
  streamed.push({
    tokenText: event.tokenText,
    finishReason: event.finishReason,
    captures: Object.fromEntries(Object.entries(event.captures).map(([h, cs]) => [h, cs.map((c) => ({ step: c.step, array: plain(c.array) }))])),
  });
}
out.streamed = streamed;
console.log(JSON.stringify(out));
"""


def wire(array: mx.array, component: str = "residual", extras: dict[str, mx.array] | None = None) -> Capture:
    return Capture("layers.0." + component, "layers.0", 0, component, 0, (0, array.shape[-2]), False, array, extras=extras or {})


def as_json_values(values: np.ndarray) -> list[Any]:
    return [v if np.isfinite(v) else ("NaN" if np.isnan(v) else ("Infinity" if v > 0 else "-Infinity")) for v in values.astype(np.float64).reshape(-1).tolist()]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_server() as url:
        yield url


@pytest.fixture(scope="module")
def node_run(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[np.ndarray]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is not installed; the JavaScript client cannot be tested")
    tmp = tmp_path_factory.mktemp("js")
    values = np.array([[0.1, -2.5, 65504.0, 6e-8], [-np.inf, np.inf, np.nan, -0.0]], dtype=np.float32)
    arrays = [mx.array(values), mx.array(values).astype(mx.float16), mx.array(values).astype(mx.bfloat16)]
    captures = [wire(a) for a in arrays]
    captures.append(wire(mx.array(values[:1]), "router", {"experts": mx.array([[7, 1]], dtype=mx.uint32)}))
    wires = [encode_capture(c, fmt) for c in captures for fmt in ("base64", "json")]
    (tmp / "wire.json").write_text(json.dumps(wires, allow_nan=False), encoding="utf-8")
    script = tmp / "run.mjs"
    script.write_text(SCRIPT.replace("MODULE_URL", MODULE.as_uri()), encoding="utf-8")
    done = subprocess.run([node, str(script), base_url, str(tmp / "wire.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = [np.array(c.array.astype(mx.float32)) for c in captures for _ in ("base64", "json")]
    return json.loads(done.stdout), expected


def test_typed_arrays_decode_every_dtype_exactly(node_run: tuple[dict[str, Any], list[np.ndarray]]) -> None:
    out, expected = node_run
    assert len(out["decoded"]) == len(expected)
    for decoded, want in zip(out["decoded"], expected):
        assert decoded["array"] == as_json_values(want)
    assert out["decoded"][-1]["extras"] == {"experts": [7, 1]}


def test_requests_and_errors(node_run: tuple[dict[str, Any], list[np.ndarray]]) -> None:
    out, _ = node_run
    assert out["health"] == "ok" and out["loaded"] == "default" and out["numLayers"] == 4
    assert out["registered"] == ["layers.0.residual", "layers.1.attention_scores"] and out["cleared"] == 0
    assert out["error"]["isNeuroScopeError"] and out["error"]["status"] == 400
    assert "out of range" in out["error"]["message"] and out["error"]["code"] == "invalid_hook"


def test_whole_and_streamed_generations_match_the_python_client(
    node_run: tuple[dict[str, Any], list[np.ndarray]], base_url: str
) -> None:
    out, _ = node_run
    hooks = ["layers.0.residual", {"layer_name": "layers.1", "component": "attention_scores"}]
    reference = NeuroScopeClient(base_url).generate_with_activations("Hi", hooks, max_tokens=2, temperature=0.0)
    assert out["whole"]["tokens"] == reference.tokens
    token_events = [e for e in out["streamed"] if e["tokenText"] is not None]
    assert [e["tokenText"] for e in token_events] == reference.tokens
    assert [e["finishReason"] for e in out["streamed"] if e["finishReason"]] == ["length"]
    for hook_id, captures in reference.captures.items():
        whole = out["whole"]["captures"][hook_id]
        streamed = [e["captures"][hook_id][0] for e in token_events]
        for capture, a, b in zip(captures, whole, streamed):
            assert a["step"] == b["step"] == capture.step and a["shape"] == capture.shape
            assert a["array"] == b["array"] == as_json_values(capture.array)


def test_module_holds_the_generated_endpoint_table() -> None:
    text = MODULE.read_text(encoding="utf-8")
    start, end = text.index(JS_BEGIN), text.index(JS_END) + len(JS_END) + 1
    assert text[start:end] == endpoints_js()


RESEARCH_SCRIPT = r"""
import { NeuroScopeClient } from "MODULE_URL";
const [baseUrl, store, hook] = process.argv.slice(2);
const client = new NeuroScopeClient(baseUrl);
const documents = Array.from({ length: 6 }, (_, i) => `Document ${i}: the cat sat on the mat.`);
const out = {};
const job = await client.startExtraction(documents, [hook], { contextSize: 32, batchSize: 4 });
out.started = job.state;
out.done = await client.waitForExtraction(job.id, { pollMs: 50, timeoutMs: 120000 });
out.listed = (await client.listExtractions()).map((j) => j.id).includes(job.id);
out.progress = await client.extractionProgress(job.id);
const long = await client.startExtraction(Array(2400).fill(documents[0]), [hook], { contextSize: 32, batchSize: 1 });
try {
  await client.waitForExtraction(long.id, { pollMs: 10, timeoutMs: 0 });
  out.timedOut = false;
} catch (e) {
  out.timedOut = e.message.includes(long.id);
}
out.cancelled = await client.cancelExtraction(long.id);
out.steering = await client.steeringVector(1, ["I love this.", "What a joy!"], ["I hate this."]);
const completion = await client.completeWithActivations("Once upon a time", [hook], { maxTokens: 3, activationFormat: "json" });
out.completion = { text: completion.text, tokens: completion.tokens, array: Array.from(completion.captures[hook][0].array) };
out.streamed = [];
for await (const event of client.streamCompletionWithActivations("Once upon a time", [hook], { maxTokens: 3 })) {
  if (event.tokenId !== null) out.streamed.push({ text: event.text, tokenText: event.tokenText, step: event.captures[hook][0].step });
}
out.distribution = await client.neuronDistribution(store, hook, 2, { bins: 8 });
out.polysemantic = await client.polysemanticNeurons(store, hook, { top: 3, neurons: [2, 5, 7] });
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def research_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], NeuroScopeClient]]:
    """The research methods run by Node against a server with the research fixtures, and a Python client of it."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is not installed; the JavaScript client cannot be tested")
    tmp = tmp_path_factory.mktemp("js-research")
    stores, saes = research_roots(tmp)
    script = tmp / "research.mjs"
    script.write_text(RESEARCH_SCRIPT.replace("MODULE_URL", MODULE.as_uri()), encoding="utf-8")
    with running_server(store_root=stores, sae_roots=(saes,)) as url:
        done = subprocess.run([node, str(script), url, STORE, STORE_HOOK], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        yield json.loads(done.stdout), NeuroScopeClient(url)


def test_js_extraction_jobs_run_list_and_cancel(research_run: tuple[dict[str, Any], NeuroScopeClient]) -> None:
    out, python = research_run
    assert out["started"] == "running" and out["listed"]
    assert out["done"]["state"] == "completed" and out["done"]["documents_done"] == 6
    assert out["progress"] == out["done"] == python.extraction_progress(out["done"]["id"])
    assert python.store_stats(out["done"]["store"], STORE_HOOK)["summary"]["tokens"] == out["done"]["tokens_done"]
    assert out["timedOut"] is True
    assert out["cancelled"]["state"] == "cancelled" and out["cancelled"]["documents_done"] < 2400


def test_js_steering_completion_and_store_analyses_answer_what_python_does(research_run: tuple[dict[str, Any], NeuroScopeClient]) -> None:
    out, python = research_run
    assert out["steering"] == python.steering_vector(1, ["I love this.", "What a joy!"], ["I hate this."])
    reference = python.complete_with_activations("Once upon a time", [STORE_HOOK], max_tokens=3, temperature=0.0)
    assert out["completion"]["text"] == reference.text and out["completion"]["tokens"] == reference.tokens
    assert out["completion"]["array"] == as_json_values(reference.captures[STORE_HOOK][0].array)
    assert [e["tokenText"] for e in out["streamed"]] == reference.tokens and [e["step"] for e in out["streamed"]] == [0, 1, 2]
    assert "".join(e["text"] for e in out["streamed"]) == reference.text
    assert out["distribution"] == python.neuron_distribution(STORE, STORE_HOOK, 2, bins=8)
    assert out["polysemantic"] == python.polysemantic_neurons(STORE, STORE_HOOK, top=3, neurons=[2, 5, 7])
