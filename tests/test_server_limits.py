"""Bounded work per request, against a real server (waitress, ephemeral port, tiny checkpoints).

Each case is one way a single request used to hold the engine or the machine: a prompt
longer than the model's context, a 15 MB prompt, a client that leaves during a long
prefill, a million duplicated indices, a JSON capture whose encoded size is over the
budget. Each must be refused (or stopped) quickly, before it costs engine time.

Timing bounds are generous (the machine is shared); the proof that work was not done is
the engine's own counters in /health, not a clock.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import numpy as np
import pytest
import requests
import tiny_checkpoints as tc
from test_server_http import start_server

import mlx_engine
from mlx_engine.wire.codec import decode_capture

CONTEXT = 1024  # the tiny llama's max_position_embeddings
LONG_CONTEXT = 1 << 17  # a llama whose context allows a prefill of many chunks
MAX_PROMPT_TOKENS = 30000
BUDGET_MB = 1
# A refusal takes well under a second on a quiet machine, the body sent over loopback included. The faults
# these tests guard against took minutes (a quadratic duplicate check: 7.6 s for 100k entries, minutes for a
# million; a 15.7M-token prompt held the engine 9 minutes), so this bound tells the two apart even on a loaded
# machine; it is not a speed claim (speed lives in benchmarks/).
FAST_S = 10.0


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    path, _ = tc.build_llama(tmp_path_factory.mktemp("longctx"), max_position_embeddings=LONG_CONTEXT)
    return path


@pytest.fixture(scope="module")
def server(llama_checkpoint, long_checkpoint, tmp_path_factory):
    root = llama_checkpoint.parent
    assert long_checkpoint.parent == root
    srv = start_server(
        [
            "--model", str(llama_checkpoint),
            "--model-root", str(root),
            "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
            "--capture-budget-mb", str(BUDGET_MB),
        ],
        tmp_path_factory.mktemp("limits") / "server.log",
    )
    r = requests.post(srv.url + "/v1/models/load", json={"model": long_checkpoint.name}, timeout=120)
    assert r.status_code == 200, r.text
    yield srv
    srv.stop()


def post(server, path: str, body: Any, timeout: float = 60, tries: int = 1) -> tuple[requests.Response, float]:
    """The answer and the quickest of `tries` round trips (the body is encoded before the clock starts).

    The machine running the tests is shared, so a bound "under a second" is checked on the best
    of a few tries; the work it guards against (quadratic validation, tokenizing 15 MB) takes
    minutes, not a second or two.
    """
    data = json.dumps(body).encode()
    best = float("inf")
    for _ in range(tries):
        tic = time.perf_counter()
        r = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=timeout)
        best = min(best, time.perf_counter() - tic)
    return r, best


def engine(server) -> dict[str, Any]:
    return requests.get(server.url + "/health", timeout=30).json()["engine"]


def idle_engine(server, deadline_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    while True:
        e = engine(server)
        if not e["busy"] and e["queue_depth"] == 0:
            return e
        assert time.monotonic() < deadline, e
        time.sleep(0.02)


COUNTERS = ("completed_generations", "cancelled_generations", "failed_generations")


def assert_refused(r: requests.Response, code: str, param: str) -> str:
    assert r.status_code in (400, 413), r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param, err
    return err["message"]


# ----------------------------------------------------------------------------- prompt length


def test_over_context_prompts_get_context_length_exceeded_with_the_numbers(server, llama_checkpoint, llama_kit):
    model = llama_checkpoint.name
    before = idle_engine(server)
    # Token ids: counted exactly on the request thread.
    r, took = post(server, "/v1/completions", {"model": model, "prompt": [5] * 1100, "max_tokens": 1})
    message = assert_refused(r, "context_length_exceeded", "prompt")
    assert f"maximum context length is {CONTEXT} tokens" in message and "1101 tokens" in message, message
    assert took < FAST_S
    # A text whose length alone does not rule it out: tokenized on the engine thread, then refused
    # with the exact count (the reference count comes from the model's own tokenizer).
    text = "def f(x):\n    return json.dumps(x)\n" * 120
    n = len(mlx_engine.tokenize(llama_kit, text))
    assert n > CONTEXT
    r, took = post(server, "/v1/completions", {"model": model, "prompt": text, "max_tokens": 10})
    message = assert_refused(r, "context_length_exceeded", "prompt")
    assert f"requested {n + 10} tokens ({n} in the prompt, 10 in the completion)" in message, message
    assert took < FAST_S
    # A chat whose messages exceed the context, as the 3,445-token prompt did.
    chat = {"model": model, "messages": [{"role": "user", "content": text * 3}], "max_tokens": 4}
    r, took = post(server, "/v1/chat/completions", chat)
    message = assert_refused(r, "context_length_exceeded", "messages")
    assert f"maximum context length is {CONTEXT} tokens" in message and took < FAST_S
    # The server's own limit applies to a model with a larger context.
    r, took = post(server, "/v1/completions", {"model": _long_id(server), "prompt": [5] * (MAX_PROMPT_TOKENS + 1)})
    message = assert_refused(r, "context_length_exceeded", "prompt")
    assert f"at most {MAX_PROMPT_TOKENS} tokens (--max-prompt-tokens)" in message and f"{MAX_PROMPT_TOKENS + 1} tokens" in message
    assert took < FAST_S
    after = idle_engine(server)
    # Nothing generated or cancelled: no request reached the generation loop (the two texts were
    # tokenized on the engine thread and refused there, which counts as a failed job).
    assert all(after[k] == before[k] for k in COUNTERS[:2]), (before, after)


def _long_id(server) -> str:
    (model,) = [m for m in requests.get(server.url + "/v1/models", timeout=30).json()["data"] if m["context_length"] == LONG_CONTEXT]
    return model["id"]


def test_a_15_mb_prompt_is_refused_before_tokenizing(server, llama_checkpoint):
    before = idle_engine(server)
    huge = "a" * 15_000_000  # 15.7M tokens for a real tokenizer; under the 16 MB body limit
    for path, body, param in (
        ("/v1/completions", {"model": llama_checkpoint.name, "prompt": huge}, "prompt"),
        ("/v1/chat/completions", {"model": llama_checkpoint.name, "messages": [{"role": "user", "content": huge}]}, "messages"),
        ("/v1/completions", {"model": _long_id(server), "prompt": huge}, "prompt"),
    ):
        r, took = post(server, path, body, tries=2)
        message = assert_refused(r, "context_length_exceeded", param)
        assert "15000000 bytes of text" in message and "at least" in message, message
        assert took < FAST_S, f"{path}: {took:.2f}s"
    # Refused on the request thread: the engine never saw them.
    after = idle_engine(server)
    assert all(after[k] == before[k] for k in COUNTERS), (before, after)


def test_a_client_that_leaves_during_a_long_prefill_frees_the_engine(server, llama_checkpoint):
    long_id = _long_id(server)
    before = idle_engine(server)
    # 24,000 prompt tokens are 47 prefill chunks of 512: minutes on this CPU, so the prefill is
    # still running when the client leaves. Token ids, so no time goes into tokenizing.
    body = json.dumps({"model": long_id, "prompt": [5] * 24000, "max_tokens": 1, "stream": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    deadline = time.monotonic() + 60
    while not engine(server)["busy"]:
        assert time.monotonic() < deadline, "the long prefill never started"
        time.sleep(0.02)
    time.sleep(1.0)  # a few chunks in
    sock.close()
    left = time.monotonic()
    after = idle_engine(server, deadline_s=60)
    freed_s = time.monotonic() - left
    # Cancelled between two prefill chunks, not after the whole prompt.
    assert after["cancelled_in_prefill"] == before["cancelled_in_prefill"] + 1, after
    assert after["cancelled_generations"] == before["cancelled_generations"] + 1, after
    assert after["completed_generations"] == before["completed_generations"], after
    # One chunk at these offsets takes well under a second here; the whole prefill takes minutes.
    assert freed_s < 20, freed_s
    # The next request starts promptly and completes.
    r, took = post(server, "/v1/completions", {"model": llama_checkpoint.name, "prompt": "import json", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    assert took < 20, took


# ----------------------------------------------------------------------------- validation is linear


MILLION = 1_000_000


@pytest.mark.parametrize(
    "field, body_part, param",
    [
        ("intervention indices", {"interventions": [{"layer_name": 0, "component": "residual", "op": "zero", "indices": [3] * MILLION}]}, "interventions[0].indices"),
        ("intervention positions", {"interventions": [{"layer_name": 0, "component": "residual", "op": "zero", "positions": [1] * MILLION}]}, "interventions[0].positions"),
        ("intervention heads", {"interventions": [{"layer_name": 0, "component": "z", "op": "zero", "heads": [1] * MILLION}]}, "interventions[0].heads"),
        ("distinct repeats", {"interventions": [{"layer_name": 0, "component": "residual", "op": "zero", "indices": list(range(MILLION // 2)) * 2}]}, "interventions[0].indices"),
        ("hook indices", {"activation_hooks": [{"layer_name": 0, "component": "residual", "indices": [3] * MILLION}]}, "activation_hooks[0].indices"),
        ("hook positions", {"activation_hooks": [{"layer_name": 0, "component": "residual", "positions": [0] * MILLION}]}, "activation_hooks[0].positions"),
    ],
)
def test_a_million_duplicated_entries_get_a_400_without_a_quadratic_check(server, llama_checkpoint, field, body_part, param):
    body = {"model": llama_checkpoint.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body_part}
    r, took = post(server, "/v1/chat/completions", body, tries=3)
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param and "repeat" in err["message"], err
    assert len(err["message"]) < 1000  # the message names a few repeats, not half a million
    assert took < FAST_S, f"{field}: {took:.2f}s"


# ----------------------------------------------------------------------------- the capture budget counts the encoding


RESIDUALS = [{"layer_name": i, "component": "residual"} for i in range(3)]
TEXT = [{"role": "user", "content": "import json\nprint(json.dumps({'a': [1, 2, 3]}))\n" * 6}]


def test_a_json_capture_over_the_budget_is_refused_before_generating(server, llama_checkpoint, llama_kit):
    model = llama_checkpoint.name
    d_model, layers = llama_kit.arch_info.d_model, len(RESIDUALS)
    prompt_len = len(mlx_engine.chat_tokens(llama_kit, TEXT))
    # 500 rows (the prompt, then one per decode pass) of 3 float32 residuals: 0.37 MiB raw,
    # 0.85 MiB with its base64 copy (fits 1 MiB), 2.6 MiB with its JSON copy (does not).
    rows = 500
    max_tokens = rows - prompt_len + 1
    assert 1 < max_tokens < CONTEXT - prompt_len
    raw = rows * d_model * 4 * layers
    assert raw + 4 * -(-raw // 3) <= BUDGET_MB * 2**20 < raw + rows * d_model * layers * 24
    before = idle_engine(server)
    stored = requests.get(server.url + "/v1/activations/captures", timeout=30).json()["data"]
    body = {"model": model, "messages": TEXT, "max_tokens": max_tokens, "temperature": 0,
            "activation_hooks": RESIDUALS, "activation_format": "json"}
    for stream in (False, True):
        r, took = post(server, "/v1/chat/completions/with_activations", {**body, "stream": stream})
        message = assert_refused(r, "capture_budget_exceeded", "activation_hooks")
        # A JSON error, not an event stream: refused before the first token.
        assert r.status_code == 413 and r.headers["Content-Type"] == "application/json"
        assert "MiB" in message and took < 5, took
    after = idle_engine(server)
    # No generation completed or was cancelled: both were refused once the prompt was tokens,
    # before the first forward pass (a refused job counts as failed).
    assert all(after[k] == before[k] for k in COUNTERS[:2]), (before, after)
    assert after["failed_generations"] == before["failed_generations"] + 2, (before, after)
    assert requests.get(server.url + "/v1/activations/captures", timeout=30).json()["data"] == stored
    # The same capture as base64 (or metadata only) fits the budget; base64 runs to the end.
    r, _ = post(server, "/v1/chat/completions/with_activations", {**body, "activation_format": "base64"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_the_json_estimate_bounds_the_json_actually_sent(server, llama_checkpoint):
    """JSON_BYTES_PER_ELEMENT must bound what the codec writes, or the budget under-counts."""
    from mlx_engine.hooks.budget import JSON_BYTES_PER_ELEMENT

    short = [{"role": "user", "content": "import json"}]
    body = {"model": llama_checkpoint.name, "messages": short, "max_tokens": 4, "temperature": 0,
            "activation_hooks": RESIDUALS, "activation_format": "json"}
    r, _ = post(server, "/v1/chat/completions/with_activations", body)
    assert r.status_code == 200, r.text[:300]
    checked = 0
    for captures in r.json()["activations"].values():
        for c in captures:
            elements = int(np.prod(c["shape"]))
            assert len(json.dumps(c["data"], separators=(",", ":"))) <= elements * JSON_BYTES_PER_ELEMENT
            assert decode_capture(c).shape == tuple(c["shape"])
            checked += 1
    assert checked >= len(RESIDUALS)


# ----------------------------------------------------------------------------- the early check without a server


def test_the_early_check_caps_texts_for_a_tokenizer_with_no_byte_bound(tmp_path):
    """WordPiece maps a whole unknown word to one token, so no bytes-per-token bound holds;
    the text is capped in bytes instead, and a text under the cap still reaches the exact check."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mlx_engine.server.context import (
        UNBOUNDED_BYTES_PER_TOKEN,
        ContextLengthExceeded,
        PromptLimits,
    )

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]", max_input_chars_per_word=10**9))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    word = "b" * 5000
    assert len(tokenizer(word)["input_ids"]) == 1  # 5000 bytes, one token: no per-token bound
    limits = PromptLimits.for_model({"max_position_embeddings": 128}, tokenizer, max_prompt_tokens=100)
    assert limits.bytes_per_token is None and limits.context == 128 and limits.max_prompt_tokens == 100
    cap = 100 * UNBOUNDED_BYTES_PER_TOKEN
    limits.check_texts(["b" * cap], None, "prompt")  # at the cap: left to the exact check
    with pytest.raises(ContextLengthExceeded) as refused:
        limits.check_texts(["b" * (cap // 2), "é" * (cap // 4 + 1)], None, "messages")
    assert refused.value.param == "messages" and refused.value.code == "context_length_exceeded"
    assert f"at most {cap} bytes" in refused.value.message and f"{cap + 2} bytes of text" in refused.value.message
    # With neither a context nor a server limit there is nothing to cap against.
    PromptLimits(None, None, None).check_texts(["b" * 10**6], None, "prompt")


def test_the_byte_bound_is_sound_for_the_tiny_tokenizer(llama_kit):
    """The early check may refuse only texts that really are too long: ceil(bytes / bound) <= tokens."""
    from mlx_engine.server.context import max_input_bytes_per_token

    bound = max_input_bytes_per_token(llama_kit.tokenizer)
    assert bound is not None
    vocab = sorted(llama_kit.tokenizer.get_vocab(), key=len, reverse=True)[:50]
    texts = ["a" * 5000, "import json\n" * 300, " " * 4000, "".join(vocab) * 20, "é∂😀" * 500]
    for text in texts:
        tokens = len(mlx_engine.tokenize(llama_kit, text))
        assert -(-len(text.encode()) // bound) <= tokens, (text[:40], bound, tokens)
