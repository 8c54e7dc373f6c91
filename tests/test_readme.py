"""The README does what it says: its Python blocks run, its curl examples get real answers,
and CI runs its two commands.

The curl examples and the openai block name `localhost:8080`; they are pointed at a real
server on a free port, with the embedded default model, and otherwise run as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from neuroscope_server import running_server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# The model-management examples name a folder of the reader's own; against the test server
# (no model root) they must get a clean 4xx, which is what those lines check.
READERS_OWN_MODEL = '"my-model"'


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def ci_block(marker: str) -> str:
    after = README.split(f"<!-- ci:{marker} -->\n", 1)
    assert len(after) == 2, f"README lacks the <!-- ci:{marker} --> marker .ci/run reads"
    match = FENCE.search(after[1])
    assert match is not None and after[1].startswith("```"), f"no code block right after ci:{marker}"
    return match.group(2).strip()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The folders the README's server is started with, as its examples name them ($STORES, $SAES)."""
    return {"STORES": str(tmp_path_factory.mktemp("stores")), "SAES": str(tmp_path_factory.mktemp("saes"))}


@pytest.fixture(scope="module")
def base_url(roots: dict[str, str]) -> Iterator[str]:
    # A store root (the extraction examples write their stores there) and an SAE root.
    with running_server(store_root=Path(roots["STORES"]), sae_roots=(Path(roots["SAES"]),)) as url:
        yield url


def test_ci_runs_the_readme_commands() -> None:
    demo, tests = ci_block("demo"), ci_block("test")
    assert "pip install -e ." in demo and demo.endswith("mlx-engine demo")
    assert 'pip install -e ".[test]"' in tests and tests.endswith("python -m pytest -q -n auto --maxprocesses 4 --dist loadfile")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command demo" in ci and "readme_command test" in ci


def test_python_blocks_run_in_order(base_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each Python block runs in one namespace, as a reader would paste them in order."""
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for index, source in enumerate(blocks("python")):
        if source.lstrip().startswith("class Queue:"):
            continue  # generated sample text, not a program
        source = source.replace("http://127.0.0.1:8080", base_url)
        try:
            exec(compile(source, f"README.md python block {index}", "exec"), namespace)
        except Exception as exc:  # the block's own error, named
            pytest.fail(f"README python block {index} failed: {exc!r}\n{source}")
    client = namespace.get("client")
    if client is not None:
        client.close()  # its keep-alive connection would hold the server's shutdown
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 16, "the streaming example prints one line per generated token"
    assert all(len(re.findall(r"\d+\.\d", line)) >= 4 for line in printed[:16])


def curl_commands() -> list[str]:
    commands: list[str] = []
    for body in blocks("sh"):
        if "curl " not in body:
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("curl "):
                commands.append(line.split(" # ")[0])
    return commands


def test_every_endpoint_has_a_curl_example() -> None:
    from mlx_engine.server import ServerConfig, create_app

    app = create_app(ServerConfig())
    routes = {str(rule) for rule in app.url_map.iter_rules() if not str(rule).startswith("/static")}
    text = " ".join(curl_commands())
    for route in routes:
        pattern = re.sub(r"<(?:path:)?[^>]+>", "[^ /']+", route)
        assert re.search(pattern + r"(?:['? ]|$)", text), f"no curl example in README for {route}"


CURL_WRAPPER = r"""
curl() {
  # Record each call and its HTTP status; the body goes where the example sends it.
  printf '%s\0' "$*" >> "$CURL_LOG"
  command curl --max-time 120 -w '%{stderr}%{http_code}\n' "$@" 2>> "$CURL_STATUS"
}
"""


def make_capture(base_url: str) -> str:
    """A real capture id for the examples that name CAPTURE_ID (one block deletes its own)."""
    made = subprocess.run(
        ["curl", "-s", f"{base_url}/v1/chat/completions/with_activations", "-H", "Content-Type: application/json",
         "-d", json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                           "activation_hooks": ["layers.0.residual", "layers.1.residual"]})],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(made.stdout)["capture_id"]


def test_curl_examples_get_real_answers(base_url: str, roots: dict[str, str], tmp_path: Path) -> None:
    """Every shell block with curl in it runs as a script, against the real server."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    host = base_url[len("http://"):]
    calls = 0
    for index, body in enumerate(b for b in blocks("sh") if "curl " in b):
        script = body.replace("localhost:8080", host).replace("CAPTURE_ID", make_capture(base_url))
        log, status = tmp_path / f"log{index}", tmp_path / f"status{index}"
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + CURL_WRAPPER + script],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env={**os.environ, **roots, "CURL_LOG": str(log), "CURL_STATUS": str(status),
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},  # this mlx-engine
        )
        assert done.returncode == 0, f"README shell block {index} failed:\n{script}\n{done.stderr[-2000:]}"
        commands = log.read_text().split("\0")[:-1]
        statuses = [int(line) for line in status.read_text().split()]
        assert len(commands) == len(statuses) == body.count("curl ")
        for command, code in zip(commands, statuses):
            if READERS_OWN_MODEL in command:
                assert 400 <= code < 500, command
            else:
                assert code < 400, f"{command} -> HTTP {code}"
        calls += len(commands)
    assert calls >= 20, "the README lost its curl examples"
