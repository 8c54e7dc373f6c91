"""The ES module client (js/neuroscope-client.mjs) in headless Chromium, across origins.

A page and the module are served by a plain `http.server` on one loopback port; the
mlx-engine server runs on another port, so every call the page makes is cross-origin.
The server requires an API key and allows the page's origin through CORS, so the
client's requests (JSON bodies, an Authorization header) are preflighted. The page
streams a chat with base64 activations, decodes them to Float32Arrays with the module,
and POSTs what it got back to the page server (its own origin), where the test reads it.

What is checked: the browser really enforces CORS (a request with a header the server
does not allow is refused by the preflight), the allowed requests were preflighted and
succeeded, and every streamed capture decoded in the browser equals the same capture
from a non-streamed request decoded by the Python client.

Debian: `apt-get install -y chromium` provides /usr/bin/chromium.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlencode

import numpy as np
import pytest
from neuroscope_server import running_server

import mlx_engine.integrations.neuroscope as neuroscope
from mlx_engine.integrations.neuroscope.client import NeuroScopeClient
from mlx_engine.loading import DEFAULT_MODEL_DIR

CHROMIUM = Path("/usr/bin/chromium")
MODULE = Path(neuroscope.__file__).resolve().parent / "js" / "neuroscope-client.mjs"
API_KEY = "browser-test-key"
PROMPT = "Hi"
MAX_TOKENS = 3
HOOKS: list[Any] = ["layers.0.residual", {"layer_name": "layers.3", "component": "attention_pattern"}]
RESULT_TIMEOUT_S = 180.0
# Streamed and whole captures come from two forward passes with the same kernels and shapes,
# and base64 -> Float32Array is lossless, so the values should be bit-identical; the
# tolerance only leaves room for a different float32 reduction order (a few ulp).
RTOL, ATOL = 1e-6, 1e-7

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>neuroscope client</title></head>
<body><pre id="status">running</pre>
<script type="module">
const params = new URLSearchParams(location.search);
const api = params.get("api");
const out = { origin: location.origin };
try {
  const { NeuroScopeClient } = await import("./neuroscope-client.mjs");
  let client = new NeuroScopeClient(api, { apiKey: params.get("key") });
  try {
    out.health = (await client.health()).status;
    out.defaultFetch = "ok";
  } catch (e) {
    // Reported by its own test; the rest of the run goes on with the global fetch bound to window.
    out.defaultFetch = String(e);
    client = new NeuroScopeClient(api, { apiKey: params.get("key"), fetch: (...args) => fetch(...args) });
    out.health = (await client.health()).status;
  }
  out.model = await client.currentModel();
  const hooks = JSON.parse(params.get("hooks"));
  const options = { maxTokens: Number(params.get("max_tokens")), temperature: 0, activationFormat: "base64" };
  out.events = [];
  for await (const event of client.streamWithActivations(params.get("prompt"), hooks, options)) {
    const captures = {};
    for (const [hook, list] of Object.entries(event.captures)) {
      captures[hook] = list.map((c) => ({
        step: c.step, shape: c.shape, dtype: c.dtype, encoding: c.encoding,
        isFloat32Array: c.array instanceof Float32Array, values: Array.from(c.array),
      }));
    }
    out.events.push({ tokenText: event.tokenText, finishReason: event.finishReason, captures });
  }
  try {
    await fetch(api + "/v1/models", { headers: { "X-Not-Allowed": "1", Authorization: "Bearer " + params.get("key") } });
    out.disallowedHeader = "allowed";
  } catch (e) {
    out.disallowedHeader = "refused: " + e;
  }
} catch (e) {
  out.error = String((e && e.stack) || e);
}
await fetch("/result", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(out) });
document.getElementById("status").textContent = "done";
</script></body></html>
"""


class PageServer:
    """The page's origin: serves the page and the module, and receives the page's result."""

    def __init__(self) -> None:
        self.result: Optional[dict[str, Any]] = None
        self.received = threading.Event()
        files = {"/index.html": (PAGE.encode(), "text/html; charset=utf-8"), "/neuroscope-client.mjs": (MODULE.read_bytes(), "text/javascript")}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path not in files:
                    self.send_error(404)
                    return
                body, content_type = files[path]
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                if self.path != "/result":
                    self.send_error(404)
                    return
                owner.result = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(204)
                self.end_headers()
                owner.received.set()

            def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="page-server", daemon=True)

    def __enter__(self) -> "PageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class RequestLog(logging.Handler):
    """(method, path, status) of every request the API server finished, from its access log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests: list[tuple[str, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "request %s: %s %s -> %d in %.3fs":
            self.requests.append((record.args[1], record.args[2], record.args[3]))  # type: ignore[index]


@contextmanager
def api_server(page_origin: str, log: RequestLog) -> Iterator[str]:
    """The default model behind an API key, with CORS allowing only `page_origin`."""
    logger = logging.getLogger("mlx_engine.server")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    try:
        with running_server("default", api_key=API_KEY, cors_origins=(page_origin,)) as url:
            yield url
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)


@contextmanager
def chromium(url: str, profile: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Headless Chromium on `url` in its own process group, killed (group and all) on exit."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile / 'profile'}",
    ]
    stderr = open(profile / "chromium.log", "wb")
    proc = subprocess.Popen([str(CHROMIUM), *flags, url], stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)  # the wrapper script, the browser and its helpers
                proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        stderr.close()


def wait_for(page: PageServer, proc: subprocess.Popen[bytes], log_file: Path) -> dict[str, Any]:
    deadline = time.monotonic() + RESULT_TIMEOUT_S
    while not page.received.wait(0.5):
        if proc.poll() is not None:
            pytest.fail(f"chromium exited with {proc.returncode} before the page reported:\n{log_file.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no result from the page within {RESULT_TIMEOUT_S:.0f}s:\n{log_file.read_text(errors='replace')[-3000:]}")
    assert page.result is not None
    return page.result


@pytest.fixture(scope="module")
def browser_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], str, RequestLog]]:
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: .ci/run installs it with apt-get")
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("the embedded default model is not in this checkout")
    tmp = tmp_path_factory.mktemp("browser")
    log = RequestLog()
    with PageServer() as page, api_server(page.origin, log) as api:
        query = urlencode({"api": api, "key": API_KEY, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "hooks": json.dumps(HOOKS)})
        with chromium(f"{page.origin}/index.html?{query}", tmp) as proc:
            result = wait_for(page, proc, tmp / "chromium.log")
        yield result, api, log


def test_page_ran_cross_origin_and_cors_is_enforced(browser_run: tuple[dict[str, Any], str, RequestLog]) -> None:
    result, api, log = browser_run
    assert "error" not in result, result.get("error")
    assert result["origin"] != api and result["health"] == "ok" and result["model"] == "default"
    # The browser refuses what the server's CORS policy does not allow: a real enforcement check.
    assert result["disallowedHeader"].startswith("refused: TypeError"), result["disallowedHeader"]
    preflights = {path for method, path, status in log.requests if method == "OPTIONS" and status == 200}
    assert {"/health", "/v1/models", "/v1/chat/completions/with_activations"} <= preflights, log.requests
    assert ("POST", "/v1/chat/completions/with_activations", 200) in log.requests, log.requests


def test_streamed_float32_arrays_equal_the_whole_capture(browser_run: tuple[dict[str, Any], str, RequestLog]) -> None:
    result, api, _ = browser_run
    reference = NeuroScopeClient(api, api_key=API_KEY).generate_with_activations(
        PROMPT, HOOKS, max_tokens=MAX_TOKENS, temperature=0.0, activation_format="base64"
    )
    token_events = [e for e in result["events"] if e["tokenText"] is not None]
    assert [e["tokenText"] for e in token_events] == reference.tokens and len(reference.tokens) == MAX_TOKENS
    assert [e["finishReason"] for e in result["events"] if e["finishReason"]] == ["length"]
    assert set(reference.captures) == {"layers.0.residual", "layers.3.attention_pattern"}
    for hook_id, captures in reference.captures.items():
        for event, capture in zip(token_events, captures):
            (streamed,) = event["captures"][hook_id]
            assert streamed["isFloat32Array"] and streamed["encoding"] == "base64" and streamed["dtype"] == "float32"
            assert streamed["step"] == capture.step and streamed["shape"] == capture.shape
            values = np.array(streamed["values"], dtype=np.float64)
            np.testing.assert_allclose(values, capture.array.astype(np.float64).reshape(-1), rtol=RTOL, atol=ATOL)


def test_client_built_with_the_default_fetch_works(browser_run: tuple[dict[str, Any], str, RequestLog]) -> None:
    """`new NeuroScopeClient(url)` in a page: the browser's fetch must be called with `this` = window."""
    result, _, _ = browser_run
    assert result["defaultFetch"] == "ok", (
        f"the default client fails in a browser: {result['defaultFetch']}; "
        "neuroscope-client.mjs stores globalThis.fetch as this.fetch and calls it as a method"
    )
