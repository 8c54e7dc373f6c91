"""Continuous batching and the prompt cache, against a real server (subprocess, tiny Llama).

The reference for every batched request is the same request sent alone to the same
server (a batch of one: the plain KV cache, the loop's own forward). Concurrent requests
with different hooks, interventions, seeds, temperatures, stop strings and lengths must
each get what they get alone:
- generated token ids identical (greedy and seeded sampling: each request has its own
  random stream), texts identical;
- logprobs within 1e-4 absolute: a batched matmul may round differently from batch 1 in
  float32's last bits;
- the prompt's captures (step 0, prefilled alone in both cases) byte-equal in base64;
  decode-step captures within 1e-4 absolute (values of order 1 to 10; seen: 1e-5).
/health's `batching.largest_batch` shows the concurrent requests really shared a forward.

The prompt cache: a repeated prompt reports `usage.prompt_tokens_details.cached_tokens`
and gives the output of the uncached run (tokens identical, logprobs within 1e-4); a
request with interventions, or a capture of every prompt position, never reuses it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import requests
from test_server_http import start_server

from mlx_engine.wire.codec import decode_capture

LOGPROB_ATOL = 1e-4
CAPTURE_ATOL = 1e-4
ROUTE = "/v1/chat/completions/with_activations"


@pytest.fixture(scope="module")
def server(llama_checkpoint, tmp_path_factory):
    srv = start_server(
        ["--model", str(llama_checkpoint), "--max-batch-size", "8", "--prompt-cache-mb", "64", "--threads", "24", "--capture-store-items", "64"],
        tmp_path_factory.mktemp("batching") / "server.log",
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def post(server, body: dict[str, Any]) -> dict[str, Any]:
    route = ROUTE if "activation_hooks" in body else "/v1/chat/completions"
    r = requests.post(server.url + route, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def health(server) -> dict[str, Any]:
    return requests.get(server.url + "/health", timeout=30).json()


def steer(d_model: int, seed: int, layer: int = 1, scale: float = 6.0) -> dict[str, Any]:
    vector = np.random.default_rng(seed).normal(size=d_model).astype(np.float32)
    return {"layer_name": layer, "component": "residual", "op": "add", "vector": vector.tolist(), "scale": scale}


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "logprobs": True, "top_logprobs": 2, "activation_format": "base64", **fields}


def requests_mix(d_model: int) -> list[dict[str, Any]]:
    """Requests that differ in every per-request setting; two share a prompt, one of them steered."""
    everything = [{"layer_name": 2, "component": "residual"}]
    return [
        chat("Write the json encoder.", max_tokens=24, temperature=0, activation_hooks=everything),
        chat("Write the json encoder.", max_tokens=24, temperature=0, activation_hooks=everything, interventions=[steer(d_model, 0)]),
        chat("def decode(self, s):", max_tokens=20, temperature=0.9, seed=7, activation_hooks=[{"layer_name": 0, "component": "mlp"}]),
        chat("class Encoder(object):", max_tokens=28, temperature=0.7, top_p=0.9, seed=123),
        chat("import json", max_tokens=16, temperature=1.0, seed=5, stop=["e"], interventions=[{"layer_name": 1, "component": "z", "op": "zero", "heads": [0, 2]}],
             activation_hooks=[{"layer_name": 1, "component": "z"}, {"layer_name": 2, "component": "mlp_post", "indices": [1, 5, 9]}]),
        chat("for key, value in", max_tokens=12, temperature=0, activation_hooks=[{"layer_name": 1, "component": "attention_pattern"}]),
        chat("return self.encoder", max_tokens=30, temperature=0.8, seed=99, interventions=[steer(d_model, 1, layer=0, scale=3.0)]),
    ]


def run_concurrently(server, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[Any] = [None] * len(bodies)
    gate = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        gate.wait()
        try:
            out[i] = post(server, bodies[i])
        except BaseException as exc:  # reported by the main thread
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def logprobs(resp: dict[str, Any]) -> np.ndarray:
    return np.array([t["logprob"] for t in resp["choices"][0]["logprobs"]["content"]])


def tokens(resp: dict[str, Any]) -> list[Any]:
    """Token strings as the logprobs list them (both routes have them), with ids where given."""
    strings = [t["token"] for t in resp["choices"][0]["logprobs"]["content"]]
    return [strings, resp.get("generated_token_ids")] if "generated_token_ids" in resp else [strings]


def assert_same_run(alone: dict[str, Any], batched: dict[str, Any]) -> None:
    assert tokens(batched) == tokens(alone)
    assert batched["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert batched["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
    np.testing.assert_allclose(logprobs(batched), logprobs(alone), atol=LOGPROB_ATOL, rtol=0)
    top_a = [[t["token"] for t in c["top_logprobs"]] for c in alone["choices"][0]["logprobs"]["content"]]
    top_b = [[t["token"] for t in c["top_logprobs"]] for c in batched["choices"][0]["logprobs"]["content"]]
    assert top_b == top_a
    assert batched.get("interventions") == alone.get("interventions")
    acts_a, acts_b = alone.get("activations") or {}, batched.get("activations") or {}
    assert acts_b.keys() == acts_a.keys()
    for hook in acts_a:
        caps_a, caps_b = acts_a[hook], acts_b[hook]
        meta = ("step", "positions", "shape", "key_positions", "indices", "edit")
        assert [[c.get(m) for m in meta] for c in caps_b] == [[c.get(m) for m in meta] for c in caps_a]
        for a, b in zip(caps_a, caps_b):
            if a["step"] == 0:  # the prompt: prefilled alone in both runs, the same arithmetic
                assert b["data"] == a["data"], f"{hook}: the prompt's capture differs"
            else:
                np.testing.assert_allclose(decode_capture(b), decode_capture(a), atol=CAPTURE_ATOL, rtol=0)


def test_concurrent_requests_each_get_what_they_get_alone(server, llama_kit):
    bodies = requests_mix(llama_kit.arch_info.d_model)
    alone = [post(server, b) for b in bodies]
    assert tokens(alone[0]) != tokens(alone[1]), "the steering must change the continuation"
    before = health(server)["batching"]
    assert before["largest_batch"] == 1  # sequential requests never share a step

    for _ in range(2):  # arrival order differs between rounds; each must still match
        batched = run_concurrently(server, bodies)
        for a, b in zip(alone, batched):
            assert_same_run(a, b)

    after = health(server)["batching"]
    assert after["largest_batch"] > 1, after
    assert after["batched_steps"] > before["batched_steps"]
    assert after["solo_generations"] == before["solo_generations"]  # the attention-pattern request was batched too
    assert after["rows"] == 0


def test_a_streaming_client_that_leaves_does_not_disturb_its_batch_mates(server):
    body = chat("Write the json decoder.", max_tokens=40, temperature=0.5, seed=3)
    alone = post(server, body)
    results: list[Any] = [None]

    def other() -> None:
        results[0] = post(server, body)

    t = threading.Thread(target=other)
    with requests.post(server.url + "/v1/chat/completions", json={"messages": body["messages"], "max_tokens": 200, "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        t.start()
        for _ in range(3):
            next(lines)
    t.join(timeout=120)
    assert_same_run(alone, results[0])
    assert requests.get(server.url + "/health", timeout=30).json()["engine"]["alive"]


def test_a_repeated_prompt_reuses_the_cached_prefix_and_gives_the_same_output(server):
    body = chat("A prompt seen once before: def encode(self, obj):", max_tokens=12, temperature=0)
    first = post(server, body)
    n_prompt = first["usage"]["prompt_tokens"]
    # Seen for the first time, only what it shares with earlier prompts (the chat template's start) is reused.
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < n_prompt - 1
    # The reference: a capture of every prompt position never reads the cache.
    uncached = post(server, {**body, "activation_hooks": [{"layer_name": 0, "component": "residual"}]})
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    hits = health(server)["batching"]["prompt_cache"]["hits"]

    again = post(server, body)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    assert health(server)["batching"]["prompt_cache"]["hits"] == hits + 1
    for run in (first, again):
        assert tokens(run)[0] == tokens(uncached)[0]
        assert run["choices"][0]["message"]["content"] == uncached["choices"][0]["message"]["content"]
        np.testing.assert_allclose(logprobs(run), logprobs(uncached), atol=LOGPROB_ATOL, rtol=0)

    # A longer prompt that starts the same way reuses the shared part.
    longer = post(server, chat("A prompt seen once before: def encode(self, obj): return", max_tokens=4, temperature=0))
    assert 0 < longer["usage"]["prompt_tokens_details"]["cached_tokens"] < longer["usage"]["prompt_tokens"]


def test_edits_and_prefix_captures_never_read_the_prompt_cache(server, llama_kit):
    body = chat("Another prompt for the cache: import json", max_tokens=8, temperature=0)
    post(server, body)  # stored

    # An intervention may change the KV of any position: the whole prompt runs again.
    steered = post(server, {**body, "interventions": [steer(llama_kit.arch_info.d_model, 2, layer=0)]})
    assert steered["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    # A capture of every prompt position: recomputed, none missing.
    hook = [{"layer_name": 1, "component": "residual"}]
    full = post(server, {**body, "activation_hooks": hook})
    n_prompt = full["usage"]["prompt_tokens"]
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    (step0,) = [c for c in full["activations"]["layers.1.residual"] if c["step"] == 0]
    assert step0["positions"] == [0, n_prompt] and step0["shape"][0] == n_prompt

    # A capture of later positions only: the prefix before them is reused, the capture is complete.
    late = post(server, {**body, "activation_hooks": [{**hook[0], "positions": [n_prompt - 2, n_prompt - 1]}]})
    assert late["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 2
    (late0,) = [c for c in late["activations"]["layers.1.residual"] if c["step"] == 0]
    assert late0["positions"] == [n_prompt - 2, n_prompt]
    np.testing.assert_allclose(decode_capture(late0), decode_capture(step0)[-2:], atol=CAPTURE_ATOL, rtol=0)
    assert late["generated_token_ids"] == full["generated_token_ids"]


def test_batched_rows_with_attention_patterns_and_edits_match_lone_runs(llama_kit):
    """The decoder itself, rows joined by hand (so they certainly share every step) against the Python API.

    Prompts of different lengths make left padding; pattern and score captures read each
    row's own key columns; tolerances as above.
    """
    import mlx_engine
    from mlx_engine.generation.batch import BatchDecoder, start_row
    from mlx_engine.hooks.names import resolve_hooks
    from mlx_engine.interventions.ops import prepare_interventions

    kit = llama_kit
    pattern = [{"layer_name": 1, "component": "attention_pattern"}, {"layer_name": 2, "component": "attention_scores"}]
    runs = [
        ("def encode(self, obj):", pattern, None, dict(max_tokens=8, temp=0.0)),
        ("x", [{"layer_name": 0, "component": "residual"}], [steer(kit.arch_info.d_model, 4, layer=0, scale=4.0)], dict(max_tokens=10, temp=0.8, seed=2)),
        ("a much longer prompt than the others, to pad them", pattern[:1], [{"layer_name": 1, "component": "z", "op": "zero", "heads": [1]}], dict(max_tokens=6, temp=0.0)),
    ]

    def arrays(acts):
        return {k: [(np.array(c.array), c.positions, c.key_positions) for c in caps] for k, caps in acts.items()}

    alone = []
    for prompt, hooks, edits, kw in runs:
        ids = mlx_engine.tokenize(kit, prompt)
        alone.append([(r.token, r.logprob, arrays(a)) for r, a in mlx_engine.create_generator_with_activations(kit, ids, hooks, interventions=edits, **kw)])

    decoder, got = BatchDecoder(kit), [[] for _ in runs]
    for i, (prompt, hooks, edits, kw) in enumerate(runs):
        ids = mlx_engine.tokenize(kit, prompt)
        bound = prepare_interventions(kit, edits, prompt_len=len(ids), max_tokens=kw["max_tokens"])
        row, first = start_row(kit, ids, resolve_hooks(kit.arch_info, kit.native, hooks), bound, **kw)

        def on_step(result, acts, i=i):
            got[i].append((result.token, result.logprob, arrays(acts)))
            return result.finish_reason is not None

        assert not on_step(*first)
        decoder.join(row, on_step, lambda error: None if error is None else pytest.fail(repr(error)))
    assert len(decoder) == 3
    while len(decoder):
        decoder.step()
    assert decoder.largest == 3

    for a_run, b_run in zip(alone, got):
        assert [t for t, _, _ in b_run] == [t for t, _, _ in a_run]
        np.testing.assert_allclose([lp for _, lp, _ in b_run], [lp for _, lp, _ in a_run], atol=LOGPROB_ATOL, rtol=0)
        for (_, _, a_acts), (_, _, b_acts) in zip(a_run, b_run):
            assert b_acts.keys() == a_acts.keys()
            for hook in a_acts:
                for (xa, pa, ka), (xb, pb, kb) in zip(a_acts[hook], b_acts[hook]):
                    assert (pb, kb) == (pa, ka) and xb.shape == xa.shape
                    finite = np.isfinite(xa)
                    assert np.array_equal(finite, np.isfinite(xb))
                    np.testing.assert_allclose(xb[finite], xa[finite], atol=CAPTURE_ATOL, rtol=0)


def test_the_prompt_cache_is_lru_and_bounded_by_bytes(llama_kit):
    """Entries are evicted least recently used first, never over the byte bound, and a lookup
    hands back the shared prefix's KV exactly (positions [0, n) of what the prompt computed)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_engine.generation.prefix_cache import PrefixCache

    def prompt_cache(tokens: list[int]) -> list:
        cache = make_prompt_cache(llama_kit.model)
        llama_kit.model(mx.array(tokens)[None], cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    a, b, c = [5, 6, 7, 8, 9, 10], [5, 6, 7, 20, 21, 22], [30, 31, 32, 33, 34, 35]
    one = sum(k.nbytes + v.nbytes for k, v in ((x.keys[..., :6, :], x.values[..., :6, :]) for x in prompt_cache(a)))
    cache = PrefixCache(max_bytes=2 * one)
    cache.store("m", a, prompt_cache(a))
    cache.store("m", b, prompt_cache(b))
    assert len(cache) == 2 and cache.total_bytes == 2 * one
    n, kv = cache.lookup("m", a + [40], limit=6)  # a is now the most recently used
    assert n == 6
    np.testing.assert_array_equal(np.array(kv[0].keys), np.array(prompt_cache(a)[0].keys[..., :6, :]))
    assert cache.lookup("other model", a, limit=5) == (0, None)
    cache.store("m", c, prompt_cache(c))  # over the bound: b, the least recently used, goes
    assert len(cache) == 2 and cache.total_bytes <= cache.max_bytes and cache.stats.evicted == 1
    assert cache.lookup("m", b, limit=5)[0] == 3  # only what b shares with a is left
    assert cache.lookup("m", c, limit=3)[0] == 3  # the limit caps what is reused
