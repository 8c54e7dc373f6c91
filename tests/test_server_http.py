"""The HTTP server end to end: `python -m mlx_engine.server` (waitress) in a subprocess on
127.0.0.1, a real tiny checkpoint, the official `openai` client and raw HTTP.

Expected outputs come from the engine run in this process on the same checkpoint, so every
check compares the server with the real thing, never with numbers written here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import openai
import pytest
import requests
import tiny_checkpoints as tc

import mlx_engine
from mlx_engine.wire.codec import decode_capture
from mlx_engine.wire.files import safetensors_to_captures

KEY = "sk-test-7f3a"
ORIGIN = "http://localhost:5173"
MAX_TOKENS_LIMIT = 4096
CONTEXT = 1024  # the tiny llama's max_position_embeddings: a prompt plus max_tokens must fit
LONG_RUN = CONTEXT - 100  # max_tokens of a generation that runs long but fits beside a short prompt
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a real server


class RunningServer:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_server(args: list[str], log_path: Path, timeout: float = 90.0) -> RunningServer:
    """Start the server CLI on a free port and wait for its 'serving on' line."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_engine.server", "--port", "0", *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"serving on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
        if match:
            return RunningServer(proc, match.group(1), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout}s:\n{log_path.read_text()}")


def build_scripted_harmony(out_dir: Path, script: list[str], loop: bool) -> Path:
    """A real gpt-oss checkpoint whose greedy output is a fixed Harmony token script.

    Attention and experts are zeroed so each position's residual is its token's embedding;
    chain tokens get one-hot embeddings and the LM head maps each to its successor. The
    script starts after the chat template's `<|start|>assistant`; with `loop` the last
    script token leads back to the first, otherwise it is followed by `<|return|>`.
    """
    import torch
    from transformers import AutoTokenizer

    _, model = tc.build_gpt_oss(out_dir, vocab_size=tc.VOCAB_SIZE + 16)
    tok = AutoTokenizer.from_pretrained(out_dir)
    # Words missing from the tiny vocabulary become added tokens (plain ASCII, which every
    # byte-level detokenizer can read); byte-level symbols such as 'Ġ' are already there.
    tok.add_tokens([s for s in script if s not in tok.get_vocab()])
    tok.save_pretrained(out_dir)
    vocab = tok.get_vocab()
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    ids = [vocab[s] for s in script]
    chain = [prompt[-1], *ids] + ([prompt[-1]] if loop else [vocab["<|return|>"]])
    successors: dict[int, int] = {}
    for a, b in zip(chain, chain[1:]):
        assert successors.setdefault(a, b) == b, "a script token needs a unique successor"
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.zeros_like(p))
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for dim, (a, b) in enumerate(successors.items()):
            embed[a, dim] = 1.0
            head[b, dim] = 2.0
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def checkpoints(llama_checkpoint, gpt_oss_checkpoint, tmp_path_factory) -> dict[str, Path]:
    return {
        "llama": llama_checkpoint,
        "gpt_oss": gpt_oss_checkpoint,
        "final": build_scripted_harmony(
            tmp_path_factory.mktemp("harmony_final"),
            # "Hello worldé": a space token, and é as its two UTF-8 byte tokens
            ["<|channel|>", "final", "<|message|>", "Hello", "Ġ", "world", "Ã", "©"],
            loop=False,
        ),
        "analysis": build_scripted_harmony(
            tmp_path_factory.mktemp("harmony_analysis"),
            ["<|channel|>", "analysis", "<|message|>", "Thinking", "<|end|>", "<|start|>"],
            loop=True,
        ),
    }


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    root = checkpoints["llama"].parent
    assert all(p.parent == root for p in checkpoints.values())
    log_dir = tmp_path_factory.mktemp("server")
    srv = start_server(
        [
            "--model", str(checkpoints["llama"]),
            "--api-key", KEY,
            "--cors-origin", ORIGIN,
            "--model-root", str(root),
            "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
            "--capture-budget-mb", "4",
            "--capture-store-items", "4",
            "--threads", "24",
        ],
        log_dir / "server.log",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model_id(checkpoints) -> str:
    return checkpoints["llama"].name


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 60)
        return session.request(method, server.url + path, **kw)

    return call


# ----------------------------------------------------------------------------- references from the engine


def reference(kit, messages=None, prompt=None, max_tokens=16, top_logprobs=0, stop=()):
    tokens = mlx_engine.chat_tokens(kit, messages) if messages is not None else mlx_engine.tokenize(kit, prompt)
    results = list(
        mlx_engine.create_generator(kit, tokens, max_tokens=max_tokens, temp=0.0, top_logprobs=top_logprobs, stop_strings=stop)
    )
    return tokens, results


def text_of(results) -> str:
    return "".join(r.text for r in results)


USER = [{"role": "user", "content": "Write the json encoder."}]


# ----------------------------------------------------------------------------- SSE over a raw socket


class RawSSE:
    """A streaming request over a plain socket: raw bytes, de-chunked, each piece tagged with
    the socket read it arrived in (1, 2, ...), which orders arrivals without a clock."""

    def __init__(self, url: str, path: str, body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        payload = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}", f"Authorization: Bearer {KEY}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        self.buffer = b""
        self.reads = 0
        self.headers = self._read_headers()

    def _recv(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.reads += 1
        self.buffer += data
        return True

    def _read_headers(self) -> dict[str, str]:
        while b"\r\n\r\n" not in self.buffer:
            assert self._recv(), "connection closed before headers"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    def chunks(self):
        """Yield (read number, chunk bytes) of the chunked body as the bytes arrive."""
        while True:
            while b"\r\n" not in self.buffer:
                if not self._recv():
                    return
            size_line, rest = self.buffer.split(b"\r\n", 1)
            size = int(size_line, 16)
            while len(rest) < size + 2:
                assert self._recv(), "connection closed inside a chunk"
                size_line, rest = self.buffer.split(b"\r\n", 1)
            self.buffer = rest[size + 2 :]
            if size == 0:
                return
            yield self.reads, rest[:size]

    def events(self):
        """Yield (read number, event text) of each SSE event; asserts the `data: ...\\n\\n` framing."""
        pending = b""
        for read, chunk in self.chunks():
            pending += chunk
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                assert event.startswith(b"data: ") and b"\n" not in event, event
                yield read, event[6:].decode()
        assert pending == b"", f"bytes after the last event: {pending!r}"

    def close(self) -> None:
        self.sock.close()


def sse_json(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    stream = RawSSE(url, path, body)
    assert stream.status == 200, stream.buffer
    events = [e for _, e in stream.events()]
    stream.close()
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def engine_when_idle(http, deadline_s: float = 120.0) -> dict[str, Any]:
    """GET /health once the engine thread has no job running or queued.

    The deadline only stops a hung test from waiting forever; it is not a speed check.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        health = http("GET", "/health").json()
        if not health["engine"]["busy"] and health["engine"]["queue_depth"] == 0:
            return health
        assert time.monotonic() < deadline, f"engine still busy after {deadline_s}s: {health['engine']}"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- OpenAI client


def test_models_list_and_retrieve(client, model_id):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].object == "model" and models.data[0].owned_by == "mlx-engine"
    assert client.models.retrieve(model_id).id == model_id


def test_chat_matches_the_engine(client, model_id, llama_kit):
    tokens, results = reference(llama_kit, USER, max_tokens=24)
    resp = client.chat.completions.create(model=model_id, messages=USER, max_tokens=24, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text_of(results)
    assert choice.finish_reason == results[-1].finish_reason
    assert resp.usage.prompt_tokens == len(tokens)
    assert resp.usage.completion_tokens == len(results)
    assert resp.usage.total_tokens == len(tokens) + len(results)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == model_id


def test_chat_streaming_matches_non_streaming(client, model_id, llama_kit):
    _, results = reference(llama_kit, USER, max_tokens=24)
    stream = client.chat.completions.create(
        model=model_id, messages=USER, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == text_of(results)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == results[-1].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(results)
    assert len({c.id for c in chunks}) == 1


def test_completions_match_the_engine(client, model_id, llama_kit):
    prompt = "def encode(self, o):"
    tokens, results = reference(llama_kit, prompt=prompt, max_tokens=12, top_logprobs=3)
    resp = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    choice = resp.choices[0]
    assert choice.text == text_of(results)
    assert choice.finish_reason == results[-1].finish_reason
    assert resp.usage.prompt_tokens == len(tokens) and resp.usage.completion_tokens == len(results)
    np.testing.assert_allclose(choice.logprobs.token_logprobs, [r.logprob for r in results], rtol=0, atol=1e-5)
    assert len(choice.logprobs.top_logprobs) == len(results)
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_logprobs_are_the_engines_in_whole_and_streamed_responses(client, model_id, llama_kit):
    _, results = reference(llama_kit, USER, max_tokens=10, top_logprobs=3)
    resp = client.chat.completions.create(model=model_id, messages=USER, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == len(results)
    for entry, r in zip(content, results):
        assert entry.token == llama_kit.tokenizer.decode([r.token])
        assert entry.logprob == pytest.approx(r.logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([t.logprob for t in r.top_logprobs], abs=1e-5)
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    stream = client.chat.completions.create(
        model=model_id, messages=USER, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [lp for c in stream if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([r.logprob for r in results], abs=1e-5)


def test_stop_strings_and_seeded_sampling(client, model_id, llama_kit):
    _, results = reference(llama_kit, USER, max_tokens=24)
    full = text_of(results)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if not stop.strip():
        stop = full[-2:]
    _, stopped = reference(llama_kit, USER, max_tokens=24, stop=(stop,))
    resp = client.chat.completions.create(model=model_id, messages=USER, max_tokens=24, temperature=0, stop=[stop])
    assert resp.choices[0].message.content == text_of(stopped)
    assert resp.choices[0].finish_reason == "stop" and stop not in resp.choices[0].message.content
    sampled = [
        client.chat.completions.create(model=model_id, messages=USER, max_tokens=16, temperature=1.0, seed=1234).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_activations_through_extra_body(client, http, model_id, llama_kit):
    hooks = [{"layer_name": 1, "component": "residual"}, {"layer_name": "blocks.0.attn.hook_pattern"}]
    tokens = mlx_engine.chat_tokens(llama_kit, USER)
    expected = list(mlx_engine.create_generator_with_activations(llama_kit, tokens, hooks, max_tokens=6, temp=0.0))
    resp = client.chat.completions.create(
        model=model_id, messages=USER, max_tokens=6, temperature=0,
        extra_body={"activation_hooks": hooks, "activation_format": "base64"},
    )
    extra = resp.model_extra
    assert resp.choices[0].message.content == "".join(r.text for r, _ in expected)
    assert extra["prompt_token_ids"] == tokens
    assert extra["prompt_tokens_text"] == [llama_kit.tokenizer.decode([t]) for t in tokens]
    assert extra["generated_token_ids"] == [r.token for r, _ in expected]
    assert extra["generated_tokens_text"] == [llama_kit.tokenizer.decode([r.token]) for r, _ in expected]
    acts = extra["activations"]
    assert set(acts) == {"layers.1.residual", "layers.0.attention_pattern"}
    for hook_id, wire in acts.items():
        assert [c["step"] for c in wire] == list(range(len(expected)))
        for c, (_, step) in zip(wire, expected):
            ref = np.array(step[hook_id][0].array)
            assert c["encoding"] == "base64" and c["shape"] == list(ref.shape)
            np.testing.assert_allclose(decode_capture(c), ref, rtol=0, atol=1e-6)
    assert acts["layers.1.residual"][0]["positions"] == [0, len(tokens)]
    assert acts["layers.0.attention_pattern"][1]["key_positions"] == list(range(len(tokens) + 1))

    blob = http("GET", f"/v1/activations/captures/{extra['capture_id']}")
    assert blob.status_code == 200 and blob.headers["Content-Type"] == "application/octet-stream"
    captures, meta = safetensors_to_captures(blob.content)
    assert meta["capture_id"] == extra["capture_id"] and json.loads(meta["prompt_token_ids"]) == tokens
    assert json.loads(meta["generated_tokens_text"]) == extra["generated_tokens_text"]
    for hook_id, wire in acts.items():
        assert [c.step for c in captures[hook_id]] == [c["step"] for c in wire]
        for cap, c in zip(captures[hook_id], wire):
            np.testing.assert_array_equal(np.array(cap.array), decode_capture(c))


def test_with_activations_streaming_puts_each_steps_captures_in_its_chunk(server, llama_kit, model_id):
    tokens = mlx_engine.chat_tokens(llama_kit, USER)
    chunks = sse_json(server.url, "/v1/chat/completions/with_activations", {
        "model": model_id, "messages": USER, "max_tokens": 5, "temperature": 0, "stream": True,
        "activation_hooks": [{"layer_name": "model.layers.2", "component": "mlp"}], "activation_format": "json",
    })
    first, steps, final = chunks[0], [c for c in chunks[1:-1]], chunks[-1]
    assert first["prompt_token_ids"] == tokens and first["capture_id"].startswith("cap-")
    assert first["prompt_tokens_text"] == [llama_kit.tokenizer.decode([t]) for t in tokens]
    assert len(steps) == 5 and final["choices"][0]["finish_reason"] == "length" and final["capture_id"] == first["capture_id"]
    for i, chunk in enumerate(steps):
        (capture,) = chunk["activations"]["layers.2.mlp"]
        assert capture["step"] == i and capture["encoding"] == "json"
        rows = len(tokens) if i == 0 else 1
        assert capture["shape"] == [rows, llama_kit.arch_info.d_model] and np.array(capture["data"]).shape == (rows, 64)
        assert chunk["token_text"] == llama_kit.tokenizer.decode([chunk["token_id"]])


def test_registered_hooks_serve_later_requests(http, model_id):
    assert http("DELETE", "/v1/activations/hooks").json()["data"] == []
    r = http("POST", "/v1/activations/hooks", json={"hooks": ["blocks.0.hook_resid_post", {"layer_name": 2, "component": "key", "hook_id": "k2"}]})
    assert r.status_code == 200, r.text
    assert [h["hook_id"] for h in r.json()["data"]] == ["layers.0.residual", "k2"]
    assert http("POST", "/v1/activations/hooks", json={"hooks": [{"layer_name": 2, "component": "key", "hook_id": "k2"}]}).status_code == 400
    body = {"messages": USER, "max_tokens": 3, "temperature": 0, "activation_format": "none"}
    resp = http("POST", "/v1/chat/completions/with_activations", json=body).json()
    assert set(resp["activations"]) == {"layers.0.residual", "k2"}
    assert resp["activations"]["k2"][0]["shape"] == [2, len(resp["prompt_token_ids"]), 16]
    assert resp["activations"]["k2"][0]["data"] is None
    # a plain chat request without hooks stays a plain OpenAI response
    assert "activations" not in http("POST", "/v1/chat/completions", json=body).json()
    assert [h["hook_id"] for h in http("DELETE", "/v1/activations/hooks", params={"hook_id": "k2"}).json()["data"]] == ["layers.0.residual"]
    assert http("GET", "/v1/activations/hooks", params={"model": model_id}).json()["data"][0]["component"] == "residual"
    http("DELETE", "/v1/activations/hooks")
    err = http("POST", "/v1/chat/completions/with_activations", json=body)
    assert err.status_code == 400 and err.json()["error"]["code"] == "no_hooks"


def test_capture_store_is_bounded(http):
    body = {"messages": USER, "max_tokens": 2, "activation_hooks": [{"layer_name": 0, "component": "residual"}], "activation_format": "none"}
    ids = [http("POST", "/v1/chat/completions/with_activations", json=body).json()["capture_id"] for _ in range(5)]
    listed = [c["capture_id"] for c in http("GET", "/v1/activations/captures").json()["data"]]
    assert listed == ids[1:]  # --capture-store-items 4: the oldest went
    gone = http("GET", f"/v1/activations/captures/{ids[0]}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "capture_not_found"
    assert http("DELETE", f"/v1/activations/captures/{ids[1]}").json()["deleted"] is True


def test_capture_over_budget_is_refused_before_generating(http):
    before = engine_when_idle(http)
    stored = http("GET", "/v1/activations/captures").json()["data"]
    r = http("POST", "/v1/chat/completions/with_activations", json={
        "messages": USER, "max_tokens": LONG_RUN, "stream": True,
        "activation_hooks": [{"layer_name": i, "component": "attention_scores"} for i in range(3)],
    })
    assert r.status_code == 413
    # A streamed request answers with its headers at the first generated token; a JSON error
    # instead of an event stream means the refusal came before that token.
    assert r.headers["Content-Type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "capture_budget_exceeded" and err["param"] == "activation_hooks"
    assert "MiB" in err["message"]
    # Nothing generates afterwards either: once the engine is idle, no generation has completed
    # or been cancelled, and no capture was kept.
    after = engine_when_idle(http)
    for counter in ("completed_generations", "cancelled_generations"):
        assert after["engine"][counter] == before["engine"][counter], (counter, before["engine"], after["engine"])
    assert after["capture_store"] == before["capture_store"]
    assert http("GET", "/v1/activations/captures").json()["data"] == stored


# ----------------------------------------------------------------------------- streaming over the wire


def test_sse_framing_on_the_wire(server, model_id):
    stream = RawSSE(server.url, "/v1/chat/completions", {"model": model_id, "messages": USER, "max_tokens": 8, "stream": True})
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["transfer-encoding"] == "chunked" and stream.headers["cache-control"] == "no-cache"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", stream.headers["x-request-id"])
    events = [e for _, e in stream.events()]  # asserts `data: <one line>\n\n` for every event
    stream.close()
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_events_arrive_while_generation_is_still_running(server, http, model_id):
    before = engine_when_idle(http)["engine"]
    stream = RawSSE(server.url, "/v1/completions", {"model": model_id, "prompt": "import json", "max_tokens": 400,
                                                     "temperature": 0, "stream": True, "logprobs": 1})
    events = stream.events()
    first = next(events)
    # Had the server buffered the body, nothing would arrive before the generation ended.
    # Instead, the first event is in the client's hands while the engine is still generating.
    during = http("GET", "/health").json()["engine"]
    assert during["busy"] and during["completed_generations"] == before["completed_generations"], during
    reads = [first[0]] + [read for read, _ in events]
    stream.close()
    assert len(reads) >= 400
    # The body comes in many reads, and many events arrive in reads before the last event's.
    assert stream.reads > 20
    assert reads[0] < reads[-1], reads
    assert sum(read < reads[-1] for read in reads) > len(reads) // 4
    after = engine_when_idle(http)["engine"]
    assert after["completed_generations"] == before["completed_generations"] + 1


def test_disconnected_stream_stops_generating_and_frees_the_model(server, http, model_id, client):
    before = engine_when_idle(http)["engine"]
    # Greedy: this prompt then runs past 400 tokens (a sampled run may meet EOS after three events).
    stream = RawSSE(server.url, "/v1/completions", {"model": model_id, "prompt": "import json",
                                                     "max_tokens": LONG_RUN, "temperature": 0, "stream": True})
    events = stream.events()
    for _ in range(3):
        next(events)
    during = http("GET", "/health").json()["engine"]
    assert during["busy"] and during["completed_generations"] == before["completed_generations"], during
    stream.close()
    # Wait for the generation to end one way or the other; the deadline only prevents a hang.
    # Had the disconnect gone unnoticed, it would run on and end as a completed generation.
    deadline = time.monotonic() + 120
    while True:
        engine = http("GET", "/health").json()["engine"]
        if any(engine[k] != before[k] for k in ("cancelled_generations", "completed_generations", "failed_generations")):
            break
        assert time.monotonic() < deadline, f"generation neither cancelled nor finished: {engine}"
        time.sleep(0.02)
    # The client going away cancelled it, and freed the engine: idle, nothing queued.
    engine = engine_when_idle(http)["engine"]
    assert engine["cancelled_generations"] == before["cancelled_generations"] + 1, engine
    assert engine["completed_generations"] == before["completed_generations"], engine
    assert engine["failed_generations"] == before["failed_generations"], engine
    resp = client.chat.completions.create(model=model_id, messages=USER, max_tokens=4, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    # The next request ran as the only new job: one completion, no further cancellation.
    after = engine_when_idle(http)["engine"]
    assert after["completed_generations"] == before["completed_generations"] + 1, after
    assert after["cancelled_generations"] == before["cancelled_generations"] + 1, after


def test_concurrent_clients_get_the_sequential_answers(http, server, model_id):
    prompts = [[{"role": "user", "content": f"Question {i}: what does json.dumps({i}) return?"}] for i in range(8)]

    def ask(i: int, stream: bool) -> str:
        body = {"model": model_id, "messages": prompts[i], "max_tokens": 20, "temperature": 0}
        if stream:
            chunks = sse_json(server.url, "/v1/chat/completions", {**body, "stream": True})
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        r = http("POST", "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    sequential = [ask(i, False) for i in range(8)]
    assert len(set(sequential)) > 1
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda i: ask(i, i % 2 == 1), range(8)))
    assert concurrent == sequential
    assert http("GET", "/health").json()["engine"]["queue_depth"] == 0


# ----------------------------------------------------------------------------- auth and CORS


def test_api_key_is_required_on_v1_routes(server, model_id):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = requests.post(server.url + "/v1/chat/completions", json={"messages": USER}, headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"].startswith("Bearer")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert requests.get(server.url + "/openapi.json", timeout=30).status_code == 200


def test_cors_preflight_for_configured_origins_only(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    ok = requests.options(server.url + "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight}, timeout=30)
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "authorization" in ok.headers["Access-Control-Allow-Headers"].lower()
    other = requests.options(server.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}, timeout=30)
    assert "Access-Control-Allow-Origin" not in other.headers
    denied = requests.get(server.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert denied.status_code == 401 and denied.headers["Access-Control-Allow-Origin"] == ORIGIN


# ----------------------------------------------------------------------------- bad input


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "max_tokens": 4, **fields}


ALL_LAYERS_SCORES = [{"layer_name": i, "component": "attention_scores"} for i in range(3)]
BAD_INPUTS = [
    # (method, path, body (dict, or raw bytes), status, param, code)
    ("POST", "/v1/chat/completions", b"{not json", 400, None, "invalid_json"),
    ("POST", "/v1/chat/completions", b"", 400, None, "invalid_json"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None, "invalid_value"),
    ("POST", "/v1/chat/completions", b"null", 400, None, "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    ("POST", "/v1/chat/completions", {"max_tokens": 4}, 400, "messages", "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": "hello"}, 400, "messages", "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_value"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 400, "messages[0].content", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(max_tokens="10"), 400, "max_tokens", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(max_tokens=MAX_TOKENS_LIMIT + 1), 400, "max_tokens", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(max_completion_tokens=-1), 400, "max_completion_tokens", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(temperature=3), 400, "temperature", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(temperature="hot"), 400, "temperature", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(top_p=0), 400, "top_p", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(n=2), 400, "n", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(seed=-5), 400, "seed", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(stop=["x"] * 17), 400, "stop", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(stop=""), 400, "stop", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(logprobs="yes"), 400, "logprobs", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(top_logprobs=2), 400, None, "invalid_value"),
    ("POST", "/v1/chat/completions", chat(stream="true"), 400, "stream", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(stream_options={"include_usage": True}), 400, None, "invalid_value"),
    ("POST", "/v1/chat/completions", chat(frequency_penalty=0.5), 400, "frequency_penalty", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(tools=[]), 400, "tools", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(model="no-such-model"), 404, "model", "model_not_found"),
    ("POST", "/v1/chat/completions", chat(activation_hooks=["blocks.99.hook_resid_post"]), 400, "activation_hooks[0]", "invalid_hook"),
    ("POST", "/v1/chat/completions", chat(activation_hooks=[{"layer_name": 3, "component": "residual"}]), 400, "activation_hooks[0]", "invalid_hook"),
    ("POST", "/v1/chat/completions", chat(activation_hooks=[{"layer_name": 1, "component": "nonsense"}]), 400, "activation_hooks[0].component", "invalid_value"),
    ("POST", "/v1/chat/completions", chat(activation_hooks=["bogus.name"]), 400, "activation_hooks[0]", "invalid_hook"),
    ("POST", "/v1/chat/completions", chat(activation_hooks=[{"layer_name": 0}]), 400, "activation_hooks[0]", "invalid_hook"),
    ("POST", "/v1/chat/completions", chat(activation_hooks=[{"layer_name": 0, "component": "router"}]), 400, "activation_hooks[0]", "invalid_hook"),
    ("POST", "/v1/chat/completions", chat(activation_hooks=[{"layer_name": 0, "component": "mlp"}], activation_format="xml"), 400, "activation_format", "invalid_value"),
    ("POST", "/v1/chat/completions/with_activations", chat(max_tokens=LONG_RUN, activation_hooks=ALL_LAYERS_SCORES), 413, "activation_hooks", "capture_budget_exceeded"),
    ("POST", "/v1/chat/completions", chat(max_tokens=MAX_TOKENS_LIMIT), 400, "messages", "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": [1] * CONTEXT, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "prompt", "invalid_value"),
    ("POST", "/v1/completions", {"prompt": [99999], "max_tokens": 2}, 400, "prompt", None),
    ("POST", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "invalid_value"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ("POST", "/v1/activations/hooks", {"hooks": []}, 400, "hooks", "invalid_value"),
    ("DELETE", "/v1/activations/hooks?hook_id=missing", None, 404, "hook_id", "hook_not_found"),
    ("POST", "/v1/models/load", {"model": "../etc"}, 403, "model", "model_path_not_allowed"),
    ("POST", "/v1/models/load", {"model": "/etc"}, 403, "model", "model_path_not_allowed"),
    ("POST", "/v1/models/load", {"model": "nothing-here"}, 404, "model", "model_not_found"),
    ("POST", "/v1/models/load", {"model": "some-owner/some-model"}, 400, "model", "model_load_error"),
    ("POST", "/v1/models/unload", {"model": "no-such-model"}, 404, "model", "model_not_found"),
    ("GET", "/v1/models/no-such-model/hook_points", None, 404, "model_id", "model_not_found"),
    ("GET", "/v1/activations/captures/cap-missing", None, 404, "capture_id", "capture_not_found"),
    ("GET", "/v1/nothing", None, 404, None, "not_found"),
    ("PUT", "/v1/chat/completions", b"{}", 405, None, "method_not_allowed"),
]


def test_bad_inputs_get_error_bodies_and_the_server_keeps_serving(http, server, model_id):
    assert len(BAD_INPUTS) >= 25
    failures = []
    for method, path, body, status, param, code in BAD_INPUTS:
        kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        r = http(method, path, **kwargs)
        try:
            assert r.status_code == status, r.text
            assert r.headers["Content-Type"] == "application/json"
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == param and (code is None or err["code"] == code)
            assert err["message"] and "Traceback" not in r.text
        except AssertionError as exc:
            failures.append(f"{method} {path} {body!r:.80}: {exc}")
    assert not failures, "\n".join(failures)
    assert "n must be 1" in http("POST", "/v1/chat/completions", json=chat(n=2)).json()["error"]["message"]
    hook_error = http("POST", "/v1/chat/completions", json=chat(activation_hooks=["bogus.name"])).json()["error"]["message"]
    assert "valid layer names" in hook_error
    assert "Traceback" not in server.log()
    r = http("POST", "/v1/chat/completions", json={"model": model_id, "messages": USER, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert http("GET", "/health").json()["status"] == "ok"


def test_request_bodies_are_not_logged(http, server):
    http("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "private-prompt-4d1e"}], "max_tokens": 2})
    log = server.log()
    assert "private-prompt-4d1e" not in log
    assert re.search(r"request \S+: POST /v1/chat/completions -> 200", log)


# ----------------------------------------------------------------------------- models and Harmony


def test_model_management_and_hook_points(http, checkpoints, model_id):
    name = checkpoints["gpt_oss"].name
    loaded = http("POST", "/v1/models/load", json={"model": name})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["model_type"] == "gpt_oss" and loaded.json()["harmony"] is True
    assert sorted(m["id"] for m in http("GET", "/v1/models").json()["data"]) == sorted([model_id, name])
    points = http("GET", f"/v1/models/{name}/hook_points").json()
    assert points["num_layers"] == 4 and "router" in points["components"]
    assert points["layers"][0]["components"]["query"]["shape"] == [4, "T", 16]
    r = http("POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_required"
    r = http("POST", "/v1/chat/completions", json={"model": name, "messages": USER, "max_tokens": 6, "temperature": 0})
    message = r.json()["choices"][0]["message"]
    assert "reasoning_content" in message and "<|" not in message["content"] + message["reasoning_content"]
    assert http("POST", "/v1/models/unload", json={"model": name}).json() == {"id": name, "object": "model", "deleted": True}
    assert http("POST", "/v1/chat/completions", json={"model": name, "messages": USER}).status_code == 404
    assert [m["id"] for m in http("GET", "/v1/models").json()["data"]] == [model_id]


def test_harmony_final_channel_becomes_content(http, client, checkpoints):
    name = checkpoints["final"].name
    assert http("POST", "/v1/models/load", json={"model": name}).status_code == 200
    try:
        resp = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0)
        message = resp.choices[0].message
        assert message.content == "Hello worldé"
        assert message.model_extra["reasoning_content"] == ""
        assert resp.choices[0].finish_reason == "stop"
        assert resp.usage.completion_tokens == 9  # 8 script tokens and <|return|>
        chunks = list(client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0, stream=True, logprobs=True
        ))
        deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert deltas == ["Hello", " ", "world", "é"]  # é waits for its second byte
        logprob_tokens = [lp.token for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
        assert logprob_tokens == ["Hello", " ", "world", "\ufffd", "\ufffd"]  # content tokens only
        stopped = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=20, temperature=0, stop=["wor"])
        assert stopped.choices[0].message.content == "Hello " and stopped.choices[0].finish_reason == "stop"
    finally:
        http("POST", "/v1/models/unload", json={"model": name})


def test_harmony_analysis_channel_becomes_reasoning(http, server, checkpoints):
    name = checkpoints["analysis"].name
    assert http("POST", "/v1/models/load", json={"model": name}).status_code == 200
    try:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 21, "temperature": 0}
        resp = http("POST", "/v1/chat/completions", json=body).json()
        message = resp["choices"][0]["message"]
        # the script is 7 tokens long (role, channel, name, message, body, end, start): 21 tokens run it 3 times
        assert message["reasoning_content"] == "Thinking" * 3
        assert message["content"] == ""
        assert resp["choices"][0]["finish_reason"] == "length"
        assert resp["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
        chunks = sse_json(server.url, "/v1/chat/completions", {**body, "stream": True})
        reasoning = [c["choices"][0]["delta"]["reasoning_content"] for c in chunks if c["choices"] and "reasoning_content" in c["choices"][0]["delta"]]
        assert reasoning == ["Thinking"] * 3
        assert all("content" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    finally:
        http("POST", "/v1/models/unload", json={"model": name})


# ----------------------------------------------------------------------------- the OpenAPI document


def test_openapi_document_is_valid_and_describes_real_responses(http, server, model_id):
    import jsonschema
    from openapi_spec_validator import validate

    doc = requests.get(server.url + "/openapi.json", timeout=30).json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    routes = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    for expected in [
        ("/v1/models", "get"), ("/v1/chat/completions", "post"), ("/v1/completions", "post"),
        ("/v1/chat/completions/with_activations", "post"), ("/v1/activations/hooks", "post"),
        ("/v1/activations/hooks", "get"), ("/v1/activations/hooks", "delete"),
        ("/v1/activations/captures/{capture_id}", "get"), ("/v1/models/load", "post"), ("/v1/models/unload", "post"),
        ("/v1/models/{model_id}/hook_points", "get"), ("/health", "get"), ("/openapi.json", "get"),
    ]:
        assert expected in routes
    assert doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == MAX_TOKENS_LIMIT

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    body = {"messages": USER, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "activation_hooks": [{"layer_name": 0, "component": "query"}]}
    check(http("POST", "/v1/chat/completions", json=body).json(), "ChatCompletion")
    for chunk in sse_json(server.url, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}):
        check(chunk, "ChatCompletionChunk")
    check(http("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": 2}).json(), "Completion")
    check(http("GET", "/v1/models").json(), "ModelList")
    check(http("GET", "/health").json(), "HealthResponse")
    check(http("GET", f"/v1/models/{model_id}/hook_points").json(), "HookPointsResponse")
    check(http("POST", "/v1/chat/completions", json={}).json(), "ErrorResponse")
