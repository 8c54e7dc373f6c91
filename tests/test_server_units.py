"""The server's layers on their own: engine thread, capture store, load policy, errors, SSE."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from mlx_engine.server.capture_store import CaptureStore
from mlx_engine.server.engine import END, EngineThread
from mlx_engine.server.errors import APIError, to_error
from mlx_engine.server.loaded_models import resolve_load_request
from mlx_engine.server.schemas.requests import ChatCompletionRequest, CompletionRequest
from mlx_engine.server.sse import sse_event
from mlx_engine.hooks import CaptureBudgetError, HookSpecError


# ----------------------------------------------------------------------------- engine thread


def test_engine_runs_jobs_in_submission_order_on_one_thread():
    engine = EngineThread()
    try:
        seen: list[tuple[int, str]] = []
        gate = threading.Event()
        engine.call(lambda: None)
        blocker = threading.Thread(target=engine.call, args=(gate.wait,))
        blocker.start()
        while not engine.busy:
            time.sleep(0.001)
        threads = []
        for i in range(8):
            t = threading.Thread(target=engine.call, args=(lambda i=i: seen.append((i, threading.current_thread().name)),))
            t.start()
            threads.append(t)
            while engine.queue_depth < i + 1:  # each job is queued before the next is submitted
                time.sleep(0.001)
        gate.set()
        for t in threads + [blocker]:
            t.join(5)
        assert [i for i, _ in seen] == list(range(8))
        assert {name for _, name in seen} == {"mlx-engine"}
    finally:
        engine.stop()


def test_engine_survives_a_failing_job_and_hands_the_error_back():
    engine = EngineThread()
    try:
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0)
        assert engine.call(lambda: 41 + 1) == 42
    finally:
        engine.stop()


def test_cancelled_stream_stops_at_its_next_event_and_frees_the_engine():
    engine = EngineThread()
    try:
        produced = []

        def job(stream):
            for i in range(10_000):
                produced.append(i)
                stream.emit(i)

        stream = engine.stream("r1", job)
        assert stream.next(timeout=5) == 0
        stream.cancel()
        assert engine.call(lambda: "next job ran") == "next job ran"
        # the job emitted into a 64-event buffer; cancelling stopped it right there
        assert len(produced) <= 66
        assert engine.stats.cancelled_generations == 1
    finally:
        engine.stop()


def test_stream_errors_reach_the_reader_and_streams_end():
    engine = EngineThread()
    try:
        def failing(stream):
            stream.emit("first")
            raise HookSpecError("bad hook", param="activation_hooks[0]")

        s = engine.stream("r2", failing)
        assert s.next(timeout=5) == "first"
        with pytest.raises(HookSpecError):
            s.next(timeout=5)
        ok = engine.stream("r3", lambda stream: stream.emit("only"))
        assert ok.next(timeout=5) == "only"
        assert ok.next(timeout=5) is END
    finally:
        engine.stop()


# ----------------------------------------------------------------------------- capture store


def test_capture_store_evicts_least_recently_used_by_count_and_bytes():
    store = CaptureStore(max_items=3, max_bytes=100)
    for name in "abc":
        assert store.put(name, "m", b"x" * 10)
    store.get("a")  # a is now the most recent
    store.put("d", "m", b"x" * 10)
    assert [c.capture_id for c in store.list()] == ["c", "a", "d"]
    store.put("e", "m", b"x" * 85)  # bytes: evicts the oldest until the total fits
    assert [c.capture_id for c in store.list()] == ["d", "e"]
    assert store.total_bytes == 95
    assert not store.put("huge", "m", b"x" * 101)
    assert store.get("huge") is None and store.delete("e") and store.delete("d")
    assert len(store) == 0 and store.total_bytes == 0


# ----------------------------------------------------------------------------- load policy


@pytest.fixture()
def roots(tmp_path: Path):
    root = tmp_path / "models"
    (root / "good").mkdir(parents=True)
    (root / "good" / "config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside)
    return root, outside


def _status(fn):
    with pytest.raises(APIError) as info:
        fn()
    return info.value.status


def test_load_policy_allows_folders_under_roots(roots):
    root, _ = roots
    assert resolve_load_request("good", (root,), True) == (str(root / "good"), "good")
    assert resolve_load_request(str(root / "good"), (root,), True) == (str(root / "good"), "good")
    assert resolve_load_request("default", (), False) == ("default", "default")
    assert resolve_load_request("owner/some-model", (root,), True) == ("owner/some-model", "owner/some-model")


@pytest.mark.parametrize(
    "name",
    ["../outside", "good/../../outside", "/etc", "escape", "bad\x00name", "..\\outside"],
)
def test_load_policy_refuses_anything_outside_the_roots(roots, name):
    root, outside = roots
    status = _status(lambda: resolve_load_request(name, (root,), True))
    assert status in (403, 404)
    assert _status(lambda: resolve_load_request(str(outside), (root,), True)) == 403


def test_load_policy_refuses_hub_ids_when_disabled_and_cwd_lookalikes(roots, tmp_path, monkeypatch):
    root, _ = roots
    assert _status(lambda: resolve_load_request("owner/name", (root,), False)) == 404
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _status(lambda: resolve_load_request("owner/name", (root,), True)) == 403


# ----------------------------------------------------------------------------- schemas and errors


def _chat(**fields) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_schema_accepts_openai_shapes():
    req = ChatCompletionRequest.model_validate_json(
        _chat(
            model="m", max_completion_tokens=5, max_tokens=9, stop="x", n=1, logprobs=True, top_logprobs=3,
            stream=True, stream_options={"include_usage": True}, frequency_penalty=0, seed=7,
            messages=[{"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            activation_hooks=["blocks.0.hook_resid_post", {"layer": 1, "component": "mlp"}],
        ),
        context={"max_tokens_limit": 10},
    )
    assert req.requested_max_tokens == 5 and req.stop_strings == ("x",) and req.include_usage
    assert req.messages[0].to_template() == {"role": "system", "content": "ab"}


def test_nulls_mean_defaults_as_in_openais_api():
    req = ChatCompletionRequest.model_validate_json(_chat(temperature=None, top_p=None, stream=None, logprobs=None))
    assert (req.temperature, req.top_p, req.stream, req.logprobs) == (1.0, 1.0, False, False)
    completion = CompletionRequest.model_validate_json(json.dumps({"prompt": "x", "logprobs": None, "temperature": None}))
    assert completion.logprobs is None and completion.temperature == 1.0


@pytest.mark.parametrize(
    "body, param",
    [
        (_chat(n=2), "n"),
        (_chat(max_tokens=11), "max_tokens"),
        (_chat(temperature="0.5"), "temperature"),
        (_chat(top_logprobs=2), None),
        (_chat(stream_options={"include_usage": True}), None),
        (_chat(presence_penalty=0.5), "presence_penalty"),
        (_chat(unknown_field=1), "unknown_field"),
        (json.dumps({"messages": []}), "messages"),
        ("{not json", None),
    ],
)
def test_chat_schema_rejects_with_the_field_named(body, param):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(body, context={"max_tokens_limit": 10})
    status, err = to_error(info.value)
    assert status == 400
    assert err["error"]["param"] == param
    assert err["error"]["message"]


def test_completion_prompt_forms():
    for prompt, value in (("hi", "hi"), (["hi"], "hi"), ([1, 2], [1, 2]), ([[1, 2]], [1, 2])):
        assert CompletionRequest.model_validate_json(json.dumps({"prompt": prompt})).prompt_value == value
    for bad in ([], ["a", "b"], [[1], [2]], "", [-1]):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate_json(json.dumps({"prompt": bad}))


def test_error_mapping_of_engine_errors():
    assert to_error(CaptureBudgetError(2_000_000, 1_000_000))[0] == 413
    status, body = to_error(HookSpecError("Unknown layer", param="activation_hooks[2]"))
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, "activation_hooks[2]", "invalid_hook")
    status, body = to_error(RuntimeError("secret internals"), request_id="abc")
    assert status == 500 and "secret" not in body["error"]["message"] and "abc" in body["error"]["message"]


def test_sse_event_is_one_line_per_event():
    frame = sse_event({"text": "line one\nline two\r\n", "emoji": "é"})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2
    assert json.loads(frame[6:]) == {"text": "line one\nline two\r\n", "emoji": "é"}



# ----------------------------------------------------------------------------- app plumbing (no model needed)


@pytest.fixture()
def bare_app():
    from mlx_engine.server import ServerConfig, create_app

    app = create_app(ServerConfig(max_request_mb=0.001))
    yield app
    app.extensions["mlx_engine"].engine.stop()


def test_a_failure_mid_stream_becomes_an_error_event():
    from mlx_engine.server.routes.common import sse_response

    def chunks():
        yield {"n": 1}
        raise RuntimeError("boom")

    body = b"".join(sse_response(chunks(), "rid-1").response)
    events = body.split(b"\n\n")
    assert json.loads(events[0].removeprefix(b"data: ")) == {"n": 1}
    err = json.loads(events[1].removeprefix(b"data: "))["error"]
    assert err["code"] == "internal_error" and "rid-1" in err["message"] and "boom" not in err["message"]
    assert b"[DONE]" not in body and events[2:] == [b""]


def test_request_ids_and_oversized_bodies(bare_app):
    client = bare_app.test_client()
    assert client.get("/health", headers={"X-Request-ID": "trace-42"}).headers["X-Request-ID"] == "trace-42"
    generated = client.get("/health", headers={"X-Request-ID": "not ok!"}).headers["X-Request-ID"]
    assert generated != "not ok!" and len(generated) == 16
    r = client.post("/v1/chat/completions", data=b"x" * 4096, content_type="application/json")
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "model_required"
