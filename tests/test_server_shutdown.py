"""Ctrl-C is safe: `mlx-engine serve` stopped by SIGINT or SIGTERM during a stream.

Before, SIGINT during a stream aborted the process (`terminate called without an active
exception`, SIGABRT) and cut the client off. Now each open stream receives a final error
event (`server_shutting_down`) and `data: [DONE]`, and the process exits 0 within a bounded
time. The command is the installed console script, as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from test_server_http import RawSSE

REPO_ROOT = Path(__file__).resolve().parents[1]
EXIT_S = 30  # the bound on the exit: grace period (5 s here) + engine stop, with room for a slow machine


def serve(model: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    script = Path(sys.executable).with_name("mlx-engine")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mlx_engine.cli"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*command, "serve", "--model", str(model), "--port", "0", "--shutdown-grace", "5"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
            # As in a terminal: SIGINT at its default, whatever the test runner inherited.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 (only a signal call)
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        match = re.search(r"serving on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_stream_ends_it_cleanly_and_exits_0(llama_checkpoint, tmp_path, signum):
    log_path = tmp_path / "server.log"
    proc, url = serve(llama_checkpoint, log_path)
    try:
        stream = RawSSE(url, "/v1/completions", {"prompt": "import json", "max_tokens": 900, "stream": True, "temperature": 0})
        assert stream.status == 200
        events = stream.events()
        for _ in range(3):
            next(events)
        proc.send_signal(signum)
        sent = time.monotonic()
        rest = [e for _, e in events]  # until the server ends the chunked body
        stream.close()
        assert proc.wait(EXIT_S) == 0, log_path.read_text()
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = log_path.read_text(errors="replace")
    assert rest[-1] == "[DONE]" and rest.count("[DONE]") == 1, rest[-3:]
    final = json.loads(rest[-2])
    assert final["error"]["code"] == "server_shutting_down" and final["error"]["type"] == "server_error", final
    # Token chunks may arrive before the final event, never after it.
    assert all("choices" in json.loads(e) for e in rest[:-2])
    assert len(rest) < 900, "the generation ran to its end instead of being cancelled"
    assert took < EXIT_S
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]
    assert f"shutting down ({signal.Signals(signum).name})" in log and "stopped" in log


def test_an_idle_server_exits_0_on_sigint_and_stops_listening(llama_checkpoint, tmp_path):
    proc, url = serve(llama_checkpoint, tmp_path / "server.log")
    try:
        assert requests.get(url + "/health", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(EXIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=5)
