"""`mlx-engine serve --parallel tensor|pipeline`: a model split over 2 ring ranks, served over HTTP from rank 0.

Both ranks are started as mlx.launch starts them (MLX_RANK and MLX_HOSTFILE, ring backend on
127.0.0.1, ports found free; tests/test_distributed_serve.py does the same without HTTP), each
running the real command line: rank 0 serves on a port it picks, rank 1 follows and opens none.
What rank 0 answers is compared with the engine run in this process on the same checkpoint
(the single-process generation): greedy text exactly, captures within ATOL/RTOL 1e-4 (splitting
heads over ranks reorders float32 sums; tests/test_distributed_tensor.py says why). Every wait
is bounded and every process is killed in a `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests
from test_distributed_tensor import ATOL, RTOL, free_ports
from test_server_http import USER, RawSSE, reference, text_of

import mlx_engine
from mlx_engine.distributed.watchdog import Watchdog
from mlx_engine.server.app import create_app
from mlx_engine.server.cli import add_serve_arguments
from mlx_engine.server.config import ServerConfig
from mlx_engine.server.parallel import ALLOWED_WRITE_ENDPOINTS, refused
from mlx_engine.server.state import EXTENSION_KEY
from mlx_engine.wire.codec import decode_capture

REPO_ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow  # the cases that start a 2-rank job: left out of the quick loop (-m "not slow")
START_S = 120  # both ranks import, load their parts and connect (a slow shared machine)
EXIT_S = 30  # a signal or a lost rank: the grace period (5 s here) plus the engine's stop, with room
HTTP_S = 60


class Job:
    """The two rank processes of one `serve --parallel` job, and rank 0's URL."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[Path], url: str) -> None:
        self.procs, self.logs, self.url = procs, logs, url

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def logs_tail(self) -> str:
        return "\n".join(f"--- rank {r}\n{self.log(r)[-3000:]}" for r in range(len(self.procs)))

    def wait(self, timeout: float) -> list[int]:
        """Every rank's exit status, each within the remaining time (the test fails otherwise)."""
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not exit within {timeout}s:\n{self.logs_tail()}")

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)


@contextmanager
def serving(checkpoint: Path, out_dir: Path, parallel: str, *extra: str) -> Iterator[Job]:
    """Start the 2-rank job, wait for rank 0's 'serving on' line, and kill whatever is left at the end."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hostfile = out_dir / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(2)]))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLX_HOSTFILE": str(hostfile), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, "-m", "mlx_engine.cli", "serve", "--model", str(checkpoint), "--parallel", parallel,
            "--port", "0", "--shutdown-grace", "5", *extra]
    logs = [out_dir / f"rank{r}.log" for r in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for r, log_path in enumerate(logs):
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(
                    argv, env={**env, "MLX_RANK": str(r)}, stdout=log, stderr=subprocess.STDOUT, cwd=out_dir,
                    # As in a terminal: SIGINT at its default, whatever the test runner inherited.
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 (only a signal call)
                ))
        deadline = time.monotonic() + START_S
        url = None
        while url is None:
            match = re.search(r"serving on (http://127\.0\.0\.1:\d+)", logs[0].read_text(errors="replace"))
            if match:
                url = match.group(1)
                break
            job = Job(procs, logs, "")
            assert job.alive(), f"a rank exited before serving:\n{job.logs_tail()}"
            assert time.monotonic() < deadline, f"rank 0 did not serve within {START_S}s:\n{job.logs_tail()}"
            time.sleep(0.1)
        yield Job(procs, logs, url)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)


@pytest.fixture(scope="module")
def tensor_job(llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    with serving(llama_checkpoint, tmp_path_factory.mktemp("serve_tensor"), "tensor") as job:
        yield job


def served_model(url: str) -> str:
    (model,) = requests.get(url + "/v1/models", timeout=HTTP_S).json()["data"]
    return model["id"]


def chat(url: str, max_tokens: int = 12) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=HTTP_S, max_retries=0)
    resp = client.chat.completions.create(model=served_model(url), messages=USER, max_tokens=max_tokens, temperature=0, seed=7)
    return resp.choices[0].message.content or ""


def idle(url: str) -> dict[str, Any]:
    """GET /health once the engine has no job running or queued (bounded)."""
    deadline = time.monotonic() + HTTP_S
    while True:
        health = requests.get(url + "/health", timeout=HTTP_S).json()
        if not health["engine"]["busy"] and health["engine"]["queue_depth"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


@contextmanager
def long_stream(job: Job) -> Iterator[Iterator[str]]:
    """A long greedy chat stream through rank 0, as its events' texts; a read that stalls fails with both logs."""
    stream = None
    try:
        stream = RawSSE(job.url, "/v1/chat/completions", {"messages": USER, "max_tokens": 800, "temperature": 0, "stream": True})
        stream.sock.settimeout(HTTP_S)
        assert stream.status == 200, stream.buffer
        yield (e for _, e in stream.events())
    except TimeoutError:
        pytest.fail(f"the stream stalled for {HTTP_S}s:\n{job.logs_tail()}")
    finally:
        if stream is not None:
            stream.close()


@slow
def test_the_openai_client_through_rank_0_gets_the_single_process_text(tensor_job: Job, llama_kit: Any) -> None:
    _, expected = reference(llama_kit, messages=USER, max_tokens=12)
    assert served_model(tensor_job.url) == llama_kit.model_id
    assert chat(tensor_job.url) == text_of(expected)
    assert "rank 1 of 2" in tensor_job.log(1) and "serving on" not in tensor_job.log(1)  # rank 1 opened no port


@slow
def test_captures_through_rank_0_equal_the_single_process_ones(tensor_job: Job, llama_kit: Any) -> None:
    # A residual (whole rows on every rank) and head-wise sites (gathered from both ranks' heads).
    hooks = [{"layer_name": 1, "component": "residual"}, {"layer_name": "blocks.0.attn.hook_pattern"},
             {"layer_name": 1, "component": "z"}]
    tokens = mlx_engine.chat_tokens(llama_kit, USER)
    expected = list(mlx_engine.create_generator_with_activations(llama_kit, tokens, hooks, max_tokens=5, temp=0.0))
    resp = requests.post(tensor_job.url + "/v1/chat/completions/with_activations", timeout=HTTP_S, json={
        "messages": USER, "max_tokens": 5, "temperature": 0, "seed": 7,
        "activation_hooks": hooks, "activation_format": "base64",
    })
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["generated_token_ids"] == [r.token for r, _ in expected]
    acts = body["activations"]
    assert set(acts) == {"layers.1.residual", "layers.0.attention_pattern", "layers.1.z"}
    for hook_id, wire in acts.items():
        assert [c["step"] for c in wire] == list(range(len(expected)))
        for c, (_, step) in zip(wire, expected):
            (ref,) = step[hook_id]
            assert c["shape"] == list(ref.array.shape) and c["positions"] == list(ref.positions)
            np.testing.assert_allclose(decode_capture(c), np.array(ref.array), rtol=RTOL, atol=ATOL, err_msg=hook_id)
    n_heads = llama_kit.arch_info.n_heads
    assert acts["layers.0.attention_pattern"][0]["shape"][0] == n_heads  # every head, not rank 0's half


@slow
def test_a_stream_left_after_a_few_tokens_leaves_both_ranks_serving(tensor_job: Job, llama_kit: Any) -> None:
    before = idle(tensor_job.url)["engine"]["cancelled_generations"]
    with long_stream(tensor_job) as events:
        for _ in range(4):
            next(events)
    health = idle(tensor_job.url)
    assert health["engine"]["cancelled_generations"] == before + 1
    _, expected = reference(llama_kit, messages=USER, max_tokens=12)
    assert chat(tensor_job.url) == text_of(expected)  # both ranks stopped at the same step and serve on
    assert tensor_job.alive()


@slow
def test_other_models_and_rank_0_only_work_are_refused_with_the_reason(tensor_job: Job) -> None:
    url = tensor_job.url
    for path, body in [("/v1/models/load", {"model": "owner/other"}), ("/v1/models/unload", {"model": served_model(url)}),
                       ("/v1/analysis/logit_lens", {"prompt": "import json"})]:
        resp = requests.post(url + path, json=body, timeout=HTTP_S)
        assert resp.status_code == 409, (path, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "model_parallel_server" and error["type"] == "invalid_request_error"
        assert "model-parallel job" in error["message"] and "other ranks hold only their parts" in error["message"]
    health = requests.get(url + "/health", timeout=HTTP_S).json()
    assert health["models"] == [served_model(url)] and health["batching"]["max_batch_size"] == 1
    assert "continuous batching off" in tensor_job.log(0)


def signal_during_a_stream(job: Job, signum: int) -> list[str]:
    """Send `signum` to rank 0 while a long stream runs; the stream's remaining events."""
    with long_stream(job) as events:
        for _ in range(3):
            next(events)
        job.procs[0].send_signal(signum)
        return list(events)


def assert_both_ranks_stopped_cleanly(job: Job, rest: list[str]) -> None:
    assert job.wait(EXIT_S) == [0, 0], job.logs_tail()
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "server_shutting_down", rest[-3:]
    assert "other ranks were told to stop" in job.log(0) and "shut the job down" in job.log(1)
    assert "Traceback" not in job.log(0) + job.log(1), job.logs_tail()


@slow
def test_sigterm_to_rank_0_ends_both_ranks_with_status_0(tensor_job: Job) -> None:
    # The module's job ends here: this is the last test that uses it.
    assert_both_ranks_stopped_cleanly(tensor_job, signal_during_a_stream(tensor_job, signal.SIGTERM))


@slow
def test_a_pipeline_job_serves_the_same_text_and_stops_on_sigint(llama_checkpoint: Path, llama_kit: Any, tmp_path: Path) -> None:
    with serving(llama_checkpoint, tmp_path, "pipeline") as job:
        _, expected = reference(llama_kit, messages=USER, max_tokens=12)
        assert chat(job.url) == text_of(expected)  # blocks split over the ranks
        assert_both_ranks_stopped_cleanly(job, signal_during_a_stream(job, signal.SIGINT))


@slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_losing_rank_1_mid_generation_fails_the_request_and_ends_rank_0(llama_checkpoint: Path, tmp_path: Path, signum: int) -> None:
    # A killed rank is usually reported by the ring backend at once, though a collective started
    # after its failure can hang; a frozen one (SIGSTOP) never answers. Both end at the rank
    # timeout at the latest (distributed/watchdog.py), short here.
    with serving(llama_checkpoint, tmp_path, "tensor", "--rank-timeout", "4") as job:
        with long_stream(job) as events:
            for _ in range(3):
                next(events)
            job.procs[1].send_signal(signum)
            rest = list(events)
        try:
            code = job.procs[0].wait(EXIT_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 did not exit:\n{job.logs_tail()}")
    error = json.loads(rest[-1])["error"]
    assert error["code"] == "rank_lost" and error["type"] == "server_error", error
    assert "rank 1 of the 2-rank job stopped answering" in error["message"] and "restart the job" in error["message"], error
    assert code == 1, job.logs_tail()
    assert "a rank of the job was lost" in job.log(0)


@slow
def test_a_frozen_rank_0_mid_generation_ends_rank_1(llama_checkpoint: Path, tmp_path: Path) -> None:
    # Rank 0 stopped (SIGSTOP: a machine gone without closing its sockets) leaves rank 1 inside a
    # collective that never returns; its own watchdog ends it after the rank timeout. Waiting for
    # the next request is not watched (an idle server sends nothing), a generation is.
    with serving(llama_checkpoint, tmp_path, "tensor", "--rank-timeout", "4") as job:
        with long_stream(job) as events:
            for _ in range(3):
                next(events)
            job.procs[0].send_signal(signal.SIGSTOP)
            try:
                code = job.procs[1].wait(EXIT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank 1 still waits {EXIT_S} s after rank 0 froze:\n{job.logs_tail()}")
            job.procs[0].kill()
    assert code == 1, job.logs_tail()
    assert "error: rank 1: a generation made no progress for " in job.log(1) and "restart the whole job" in job.log(1), job.logs_tail()


def test_the_watchdog_reports_busy_work_without_progress_once() -> None:
    stalls: list[float] = []
    dog = Watchdog(2.0, stalls.append)
    dog.busy(True)
    for _ in range(10):  # progress every 0.05 s: no report
        time.sleep(0.05)
        dog.progress()
    dog.busy(False)
    time.sleep(2.5)  # idle (a caller holding the generator between tokens): no report
    assert stalls == []
    dog.busy(True)
    deadline = time.monotonic() + 30
    while not stalls:
        assert time.monotonic() < deadline, "no stall reported"
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(stalls) == 1 and stalls[0] > 2.0
    with pytest.raises(ValueError, match="positive"):
        Watchdog(0, stalls.append)


def test_only_generations_and_reads_pass_a_model_parallel_server_and_the_help_says_so() -> None:
    app = create_app(ServerConfig())
    try:
        writes = {(rule.endpoint, m) for rule in app.url_map.iter_rules() for m in rule.methods or () if m not in ("GET", "HEAD", "OPTIONS")}
    finally:
        app.extensions[EXTENSION_KEY].engine.stop()
    endpoints = {e for e, _ in writes}
    assert ALLOWED_WRITE_ENDPOINTS <= endpoints  # the list names real routes
    allowed = {e for e, m in writes if not refused(e, m)}
    # Rank-0-only model work is refused: analyses, steering vectors, extraction, attaching an SAE.
    for endpoint in ("analysis.lens", "analysis.patching", "steering.steering_vectors", "extract.start", "saes.attach"):
        assert endpoint in endpoints and endpoint not in allowed, endpoint
    assert {"openai.chat_completions", "openai.completions", "activations.chat_with_activations"} <= allowed
    assert not refused("analysis.lens", "GET") and not refused(None, "POST")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "--parallel {tensor,pipeline}" in help_text and "continuous batching off" in help_text
