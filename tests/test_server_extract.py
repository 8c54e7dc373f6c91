"""POST /v1/extract on a real server (tiny Llama, ephemeral port) writes the store `extract` writes.

- A job polled to `completed` leaves a store under --store-root whose rows, tokens, index,
  documents and statistics equal an in-process `mlx_engine.extract` of the same documents,
  hooks and options exactly (the same weights, the same batches, the same code path).
- A long job does not hold the engine: a chat request sent while it runs is answered
  while the job is still running; DELETE then stops it, and the store is left incomplete,
  opens with its committed shards, and resumes in-process to the uninterrupted store.
- Bad input gets a 4xx with an OpenAI-style error body and writes nothing under the root.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import mlx_engine  # noqa: F401, I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
import requests
from neuroscope_server import running_server

from mlx_engine.store.reader import ActivationStore

HOOKS: list[Any] = ["layers.1.residual", {"layer_name": 2, "component": "mlp_post", "indices": [5, 0, 7]}]
OPTIONS = {"context_size": 16, "batch_size": 3, "shard_tokens": 150, "top_k": 5}
JOB_TIMEOUT_S = 60


def texts(n: int) -> list[str]:
    lines = [line for line in inspect.getsource(json.decoder).splitlines() if line.strip()]
    return [lines[i % len(lines)] for i in range(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store_root")


@pytest.fixture(scope="module")
def url(llama_checkpoint: Path, root: Path) -> Iterator[str]:
    with running_server(model=str(llama_checkpoint), store_root=root) as base:
        yield base


def wait_state(url: str, job_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = requests.get(f"{url}/v1/extract/{job_id}", timeout=30).json()
        if job["state"] in states:
            return job
        assert job["state"] == "running", job
        assert time.monotonic() < deadline, f"job still {job['state']} after {JOB_TIMEOUT_S}s: {job}"
        time.sleep(0.05)


def assert_same_store(got: ActivationStore, expected: ActivationStore) -> None:
    assert got.complete and expected.complete and got.num_tokens == expected.num_tokens > 0
    assert np.array_equal(np.asarray(got.tokens()), np.asarray(expected.tokens()))
    for a, b in zip(got.index(), expected.index()):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert [d["text"] for d in got.documents()] == [d["text"] for d in expected.documents()]
    for hook in expected.hooks:
        assert np.array_equal(np.asarray(got.rows(hook)), np.asarray(expected.rows(hook))), hook
        s, e = got.stats(hook), expected.stats(hook)
        for field in ("count", "mean", "m2", "m3", "m4", "minimum", "maximum", "above", "top_values", "top_doc", "top_pos"):
            assert np.array_equal(getattr(s, field), getattr(e, field)), (hook, field)


def test_job_writes_the_in_process_store(url: str, root: Path, llama_kit, tmp_path: Path) -> None:
    docs = texts(40)
    started = requests.post(f"{url}/v1/extract", json={"documents": docs, "hooks": HOOKS, **OPTIONS}, timeout=60)
    assert started.status_code == 200, started.text
    job = started.json()
    doc = requests.get(f"{url}/openapi.json", timeout=30).json()
    schema = {"$ref": "#/components/schemas/ExtractJobResponse", "components": doc["components"]}
    jsonschema.validate(job, schema, cls=jsonschema.Draft202012Validator)
    assert started.headers["Location"] == f"/v1/extract/{job['id']}" and job["documents_total"] == len(docs)
    done = wait_state(url, job["id"], ("completed",))
    jsonschema.validate(done, schema, cls=jsonschema.Draft202012Validator)
    assert done["documents_done"] == len(docs) and done["tokens_done"] > 0 and done["error"] is None
    store = ActivationStore.open(root / done["store"])
    assert store.num_tokens == done["tokens_done"]
    expected = mlx_engine.extract(llama_kit, docs, HOOKS, tmp_path / "in_process", progress=False, **OPTIONS)
    assert_same_store(store, expected)
    listed = requests.get(f"{url}/v1/extract", timeout=30).json()
    assert job["id"] in [j["id"] for j in listed["data"]]


def test_chat_runs_during_a_job_and_cancel_leaves_it_resumable(url: str, root: Path, llama_kit, tmp_path: Path) -> None:
    docs = texts(600)
    options = {**OPTIONS, "batch_size": 1}  # one short window per engine job: many steps to interleave with
    job = requests.post(f"{url}/v1/extract", json={"documents": docs, "hooks": HOOKS, **options}, timeout=60).json()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while requests.get(f"{url}/v1/extract/{job['id']}", timeout=30).json()["shards"] < 1:  # something to resume from
        assert time.monotonic() < deadline, "no shard committed in time"
        time.sleep(0.02)
    chat = requests.post(f"{url}/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    during = requests.get(f"{url}/v1/extract/{job['id']}", timeout=30).json()
    assert during["state"] == "running", "the chat request waited for the whole extraction"
    cancelled = requests.delete(f"{url}/v1/extract/{job['id']}", timeout=60).json()
    assert cancelled["state"] == "cancelled" and cancelled["documents_done"] < len(docs)
    path = root / job["store"]
    partial = ActivationStore.open(path)
    assert not partial.complete and partial.num_tokens > 0
    resumed = mlx_engine.extract(llama_kit, docs, HOOKS, path, progress=False, **options)
    assert partial.num_tokens < resumed.num_tokens
    assert resumed.manifest["timings"]["runs"] == 2
    expected = mlx_engine.extract(llama_kit, docs, HOOKS, tmp_path / "uninterrupted", progress=False, **options)
    assert_same_store(resumed, expected)


def error(response: requests.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


@pytest.mark.parametrize("body, status, code", [
    ({"documents": ["a b"], "hooks": ["layers.99.residual"]}, 400, "invalid_hook"),
    ({"documents": ["a b"], "hooks": [{"layer_name": 0, "component": "attention_pattern"}]}, 400, "invalid_hook"),
    ({"documents": [], "hooks": HOOKS}, 400, None),
    ({"documents": ["", ""], "hooks": HOOKS}, 400, "invalid_extraction"),
    ({"documents": ["a b"], "hooks": HOOKS, "batch_size": 0}, 400, None),
    ({"documents": ["a b"], "hooks": HOOKS, "out": "/tmp/elsewhere"}, 400, None),
    ({"documents": ["a b"], "hooks": HOOKS, "model": "no-such-model"}, 404, None),
])
def test_bad_input_is_a_4xx_and_writes_nothing(url: str, root: Path, body: dict, status: int, code: Any) -> None:
    before = sorted(p.name for p in root.iterdir())
    response = requests.post(f"{url}/v1/extract", json=body, timeout=60)
    assert response.status_code == status, response.text
    if code is not None:
        assert error(response)["code"] == code
    else:
        error(response)
    assert sorted(p.name for p in root.iterdir()) == before


def test_unknown_job_is_404(url: str) -> None:
    for method in (requests.get, requests.delete):
        response = method(f"{url}/v1/extract/extract-0000", timeout=30)
        assert response.status_code == 404 and error(response)["code"] == "extract_job_not_found"


def test_no_store_root_is_403(llama_checkpoint: Path) -> None:
    with running_server(model=str(llama_checkpoint)) as base:
        response = requests.post(f"{base}/v1/extract", json={"documents": ["a"], "hooks": HOOKS}, timeout=60)
    assert response.status_code == 403 and error(response)["code"] == "store_root_not_configured"
