"""Web safety of the local API, against a real server on an ephemeral port.

A page in the user's browser can reach 127.0.0.1. These are the doors such a page (or a
careless client) used: CORS-free text/plain and form posts, DNS rebinding (a foreign Host),
a foreign Origin, a symlink out of the model roots, a newline in a URL forging a log line,
filesystem paths in error messages, and a wrong `Allow` header.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import requests
from test_server_http import start_server

ORIGIN = "http://localhost:5173"
EVIL = "http://evil.example"
ALLOWED_NAME = "models.lab.example"  # --allowed-host NAME: any port
PINNED = "pinned.example:1"  # --allowed-host NAME:PORT: that port only


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A model root of this module's own: the folders the tests add stay out of other tests' roots."""
    return tmp_path_factory.mktemp("web_root")


@pytest.fixture(scope="module")
def model_dir(llama_checkpoint, root) -> Path:
    return Path(shutil.copytree(llama_checkpoint, root / "llama"))


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside every model root (a sibling of the pytest base folder)."""
    folder = Path(tmp_path_factory.getbasetemp()).parent / f"outside-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(model_dir, root, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("web_safety")
    srv = start_server(
        [
            "--model", str(model_dir),
            "--model-root", str(root),
            "--cors-origin", ORIGIN,
            "--allowed-host", ALLOWED_NAME,
            "--allowed-host", PINNED,
        ],
        log_dir / "server.log",
    )
    srv.cwd = log_dir  # type: ignore[attr-defined]  # start_server runs the server in the log's folder
    yield srv
    srv.stop()


def raw_request(server, method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with exactly the Host header given (requests would rewrite it)."""
    addr, port = server.url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((addr, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    found = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    return int(status_line.split()[1]), found, payload


def model_ids(server) -> list[str]:
    return [m["id"] for m in requests.get(server.url + "/v1/models", timeout=30).json()["data"]]


# ----------------------------------------------------------------------------- JSON-only posts


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
def test_posts_that_are_not_json_get_415_and_change_nothing(server, model_dir, content_type):
    name = model_dir.name
    before = model_ids(server)
    for path, body in (
        ("/v1/models/unload", f'{{"model": "{name}"}}'),
        ("/v1/models/load", f'{{"model": "{name}"}}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'),
    ):
        headers = {"Origin": EVIL} | ({"Content-Type": content_type} if content_type else {})
        r = requests.post(server.url + path, data=body.encode(), headers=headers, timeout=30)
        assert r.status_code == 415, (path, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]
        assert "Access-Control-Allow-Origin" not in r.headers
    assert model_ids(server) == before  # the unload did not happen


# ----------------------------------------------------------------------------- Host header (DNS rebinding)


def test_a_foreign_host_is_refused_and_allowed_names_are_served(server):
    port = server.url.rsplit(":", 1)[1]
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    json_type = {"Content-Type": "application/json"}
    for host in ("evil.example", f"evil.example:{port}", f"localhost:{int(port) + 1}", "127.0.0.1.evil.example", "pinned.example", f"pinned.example:{port}", "bad host"):
        for method, path, payload in (("GET", "/v1/models", b""), ("POST", "/v1/chat/completions", body)):
            status, _, text = raw_request(server, method, path, host, payload, json_type)
            assert status == 421, (host, path, status, text)
            assert b'"host_not_allowed"' in text and b"--allowed-host" in text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", ALLOWED_NAME, f"{ALLOWED_NAME}:{port}", PINNED):
        status, _, text = raw_request(server, "GET", "/v1/models", host)
        assert status == 200, (host, text)
    status, _, text = raw_request(server, "POST", "/v1/chat/completions", f"{ALLOWED_NAME}:{port}", body, json_type)
    assert status == 200, text


# ----------------------------------------------------------------------------- CORS


def test_a_foreign_origin_gets_no_cors_headers_and_every_answer_varies_on_origin(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for method, path, extra in (("GET", "/v1/models", {}), ("OPTIONS", "/v1/chat/completions", preflight), ("OPTIONS", "/v1/models/load", preflight)):
        foreign = requests.request(method, server.url + path, headers={"Origin": EVIL, **extra}, timeout=30)
        assert not [h for h in foreign.headers if h.lower().startswith("access-control-")], (path, dict(foreign.headers))
        assert "Origin" in [v.strip() for v in foreign.headers.get("Vary", "").split(",")], dict(foreign.headers)
        own = requests.request(method, server.url + path, headers={"Origin": ORIGIN, **extra}, timeout=30)
        assert own.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in [v.strip() for v in own.headers.get("Vary", "").split(",")]


# ----------------------------------------------------------------------------- model folders


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def test_a_symlink_out_of_the_model_roots_is_refused(server, model_dir, root, outside):
    weights = outside / "model.safetensors"
    shutil.copy(model_dir / "model.safetensors", weights)
    linked = _copy_model(model_dir, root / "linked-out")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(weights)
    for name in ("linked-out", str(linked)):
        r = requests.post(server.url + "/v1/models/load", json={"model": name}, timeout=60)
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["code"] == "model_path_not_allowed" and "'model.safetensors'" in err["message"], err
        assert str(outside) not in r.text and str(root) not in r.text
    # A folder that links to weights inside the roots loads.
    inside = _copy_model(model_dir, root / "linked-in")
    (inside / "model.safetensors").unlink()
    (inside / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    r = requests.post(server.url + "/v1/models/load", json={"model": "linked-in"}, timeout=120)
    assert r.status_code == 200, r.text
    assert requests.post(server.url + "/v1/models/unload", json={"model": "linked-in"}, timeout=60).status_code == 200
    assert "linked-out" not in model_ids(server)


def test_no_error_body_names_the_model_root_or_the_working_directory(server, model_dir, root, outside):
    bad = {
        "bad-config": {"config.json": "{not json"},
        "no-weights": {"config.json": (model_dir / "config.json").read_text()},
        "bad-weights": {"model.safetensors": os.urandom(1000)},
        "bad-tokenizer": {"tokenizer.json": '{"x":'},
    }
    for name, files in bad.items():
        folder = _copy_model(model_dir, root / name) if name != "no-weights" else root / name
        folder.mkdir(exist_ok=True)
        for file, content in files.items():
            (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    names = [*bad, *(str(root / n) for n in bad), str(root / "missing"), str(root), str(outside),
             str(model_dir / "config.json"), "missing-folder", "a/b/../../etc", "owner/absent-model"]
    forbidden = {str(root), str(root.resolve()), str(server.cwd), str(server.cwd.resolve()), str(outside), os.getcwd()}
    for name in names:
        r = requests.post(server.url + "/v1/models/load", json={"model": name}, timeout=120)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        leaked = [f for f in forbidden if f in r.text]
        assert not leaked, (name, r.text)
        assert "Traceback" not in r.text
    # Each refusal names what the client asked for, within its folder.
    r = requests.post(server.url + "/v1/models/load", json={"model": "bad-weights"}, timeout=60)
    assert "bad-weights/model.safetensors" in r.json()["error"]["message"], r.text
    r = requests.post(server.url + "/v1/models/load", json={"model": "bad-config"}, timeout=60)
    assert "bad-config/config.json" in r.json()["error"]["message"], r.text
    # The server log keeps the full text for the operator.
    assert str(root) in server.log()


# ----------------------------------------------------------------------------- log lines and Allow


def test_a_newline_in_the_url_does_not_forge_a_log_line(server):
    forged = "2026-01-01 00:00:00,000 INFO mlx_engine.server: forged"
    for encoded in ("%0a", "%0d%0a", "%0d", "%e2%80%a8"):
        url = server.url + "/v1/nothing" + encoded + forged.replace(" ", "%20")
        assert requests.get(url, timeout=30).status_code == 404
    log = server.log()
    assert not [line for line in re.split(r"\r\n|\r|\n|\u2028", log) if line.startswith(forged)], log[-2000:]
    assert "/v1/nothing\\n2026-01-01" in log and "/v1/nothing\\r\\n2026-01-01" in log


@pytest.mark.parametrize("path", ["/v1/models/load", "/v1/models/unload"])
def test_the_allow_header_lists_the_methods_a_route_takes(server, path):
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = requests.request(method, server.url + path, timeout=30)
        assert r.status_code == 405, (method, r.status_code, r.text)
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in r.headers["Allow"].split(",")} == {"POST", "OPTIONS"}, r.headers["Allow"]
