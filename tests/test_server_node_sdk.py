"""The official `openai` Node SDK against a real server: chat, a streamed chat, the activations extension.

The script is tests/node/openai_check.mjs; its pinned SDK is installed with
`npm ci --prefix tests/node` (.ci/run does it; this test does it on first use). Texts are
compared with the engine run in this process, captures with the same request sent from
Python (byte-equal base64) and with the engine's own arrays.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from test_server_http import start_server

import mlx_engine
from mlx_engine.wire.codec import decode_capture

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

NODE_DIR = Path(__file__).resolve().parent / "node"
KEY = "sk-node-5c2e"
USER = [{"role": "user", "content": "Write the json encoder."}]  # as in openai_check.mjs
HOOK = "layers.1.residual"


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the openai Node SDK cannot run here")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not: cannot install tests/node's pinned openai SDK"
        done = subprocess.run([npm, "ci", "--silent", "--prefix", str(NODE_DIR)], capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, f"`npm ci --prefix {NODE_DIR}` failed:\n{done.stdout}{done.stderr}"
    return node


@pytest.fixture(scope="module")
def server(llama_checkpoint, tmp_path_factory):
    srv = start_server(["--model", str(llama_checkpoint), "--api-key", KEY], tmp_path_factory.mktemp("node_sdk") / "server.log")
    yield srv
    srv.stop()


def test_the_openai_node_sdk_gets_what_the_engine_and_python_get(node, server, llama_checkpoint, llama_kit):
    model = llama_checkpoint.name
    env = dict(os.environ, MLX_BASE_URL=server.url + "/v1", MLX_API_KEY=KEY, MLX_MODEL=model)
    done = subprocess.run([node, str(NODE_DIR / "openai_check.mjs")], capture_output=True, text=True, timeout=300, env=env, cwd=NODE_DIR, check=False)
    assert done.returncode == 0, done.stderr + done.stdout
    out = json.loads(done.stdout.strip().splitlines()[-1])

    tokens = mlx_engine.chat_tokens(llama_kit, USER)
    expected = list(mlx_engine.create_generator(llama_kit, tokens, max_tokens=12, temp=0.0))
    text = "".join(r.text for r in expected)
    assert out["models"] == [model]
    assert out["chat"]["content"] == text and out["chat"]["finish_reason"] == expected[-1].finish_reason
    assert out["chat"]["usage"]["prompt_tokens"] == len(tokens) and out["chat"]["usage"]["completion_tokens"] == len(expected)
    assert out["stream"] == {"content": text, "finish_reason": expected[-1].finish_reason}
    assert out["authError"] == {"status": 401, "code": "invalid_api_key", "isAuth": True}

    # The extension: the engine's own captures (float32, compared within 1e-6 as the HTTP tests do),
    # and byte for byte what the same request from Python receives.
    with_acts = list(mlx_engine.create_generator_with_activations(llama_kit, tokens, [HOOK], max_tokens=4, temp=0.0))
    body = {"model": model, "messages": USER, "max_tokens": 4, "temperature": 0,
            "activation_hooks": [{"layer_name": 1, "component": "residual"}], "activation_format": "base64"}
    python = requests.post(server.url + "/v1/chat/completions/with_activations", json=body,
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()
    for answer in (out["extended"], out["route"]):
        assert answer["content"] == "".join(r.text for r, _ in with_acts)
        assert answer["generated_token_ids"] == [r.token for r, _ in with_acts]
        wire = answer["activations"][HOOK]
        assert [c["step"] for c in wire] == list(range(len(with_acts)))
        assert [c["data"] for c in wire] == [c["data"] for c in python["activations"][HOOK]]
        for c, (_, step) in zip(wire, with_acts):
            ref = np.array(step[HOOK][0].array)
            assert c["encoding"] == "base64" and c["shape"] == list(ref.shape)
            np.testing.assert_allclose(decode_capture(c), ref, rtol=0, atol=1e-6)
