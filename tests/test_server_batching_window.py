"""Continuous batching of sliding-window models: a tiny gpt-oss (alternating window-8 and full
layers), the embedded default model (gpt-oss, window 128) and a tiny Mistral (window 8 on every layer).

The same proof as for Llama (tests/test_server_batching.py), the reference again being each
request alone: generated tokens identical, logprobs within 1e-4 absolute (a batched matmul
may round differently from batch 1 in float32's last bits), decode-step captures within
1e-4 absolute. Prompts are longer and shorter than the window and decodes run past it, so a
row's window wraps the batch's ring of slots while other rows are still inside theirs; rows
join after the ring has wrapped and leave before the others (one row left: a plain
RotatingKVCache again). Attention patterns and scores on a sliding layer must carry each
row's own window: the same key columns and key positions as the lone run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_server_batching import (
    assert_same_run,
    chat,
    health,
    post,
    run_concurrently,
    steer,
    tokens,
)
from test_server_http import start_server

LOGPROB_ATOL = 1e-4
CAPTURE_ATOL = 1e-4
SLIDING, FULL = 0, 1  # the tiny gpt-oss alternates, starting with a sliding-window layer


def test_the_tiny_model_has_a_window_the_runs_go_past(gpt_oss_kit):
    from mlx_engine.generation.batch import model_batchable

    info = gpt_oss_kit.arch_info
    assert info.sliding_window == 8 and info.layer_types[SLIDING] == "sliding_attention" and info.layer_types[FULL] == "full_attention"
    assert model_batchable(gpt_oss_kit)


def _arrays(acts):
    return {k: [(np.array(c.array), c.positions, None if c.key_positions is None else np.array(c.key_positions).tolist()) for c in caps] for k, caps in acts.items()}


def _fused(hooks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same hooks with no attention scores or patterns: every layer keeps the fused kernel and mlx-lm's masks."""
    return [{**h, "component": "attention"} if h["component"].startswith("attention_") else h for h in hooks]


def decode_batched_and_alone(kit, runs, waits: list[int]):
    """Each run alone (the Python API), then all of them in one BatchDecoder, run i joining
    after `waits[i]` more decode steps. Returns (prompt ids, alone, batched, largest batch)."""
    import mlx_engine
    from mlx_engine.generation.batch import BatchDecoder, start_row
    from mlx_engine.hooks.names import resolve_hooks
    from mlx_engine.interventions.ops import prepare_interventions

    ids = [mlx_engine.tokenize(kit, p) if isinstance(p, str) else p for p, *_ in runs]
    alone = []
    for prompt_ids, (_, hooks, edits, kw) in zip(ids, runs):
        alone.append([(r.token, r.logprob, _arrays(a)) for r, a in mlx_engine.create_generator_with_activations(kit, prompt_ids, hooks, interventions=edits, **kw)])

    decoder, got = BatchDecoder(kit), [[] for _ in runs]

    def join(i: int) -> None:
        _, hooks, edits, kw = runs[i]
        bound = prepare_interventions(kit, edits, prompt_len=len(ids[i]), max_tokens=kw["max_tokens"])
        row, first = start_row(kit, ids[i], resolve_hooks(kit.arch_info, kit.native, hooks), bound, **kw)

        def on_step(result, acts, i=i):
            got[i].append((result.token, result.logprob, _arrays(acts)))
            return result.finish_reason is not None

        assert not on_step(*first)
        decoder.join(row, on_step, lambda error: None if error is None else pytest.fail(repr(error)))

    for i, wait in enumerate(waits):
        for _ in range(wait):
            decoder.step()
        join(i)
    while len(decoder):
        decoder.step()

    for i, (a_run, b_run) in enumerate(zip(alone, got)):
        assert [t for t, _, _ in b_run] == [t for t, _, _ in a_run], f"row {i}"
        np.testing.assert_allclose([lp for _, lp, _ in b_run], [lp for _, lp, _ in a_run], atol=LOGPROB_ATOL, rtol=0)
        for (_, _, a_acts), (_, _, b_acts) in zip(a_run, b_run):
            assert b_acts.keys() == a_acts.keys()
            for hook in a_acts:
                for (xa, pa, ka), (xb, pb, kb) in zip(a_acts[hook], b_acts[hook]):
                    assert (pb, kb) == (pa, ka) and xb.shape == xa.shape, f"row {i} {hook}"
                    finite = np.isfinite(xa)
                    assert np.array_equal(finite, np.isfinite(xb))
                    np.testing.assert_allclose(xb[finite], xa[finite], atol=CAPTURE_ATOL, rtol=0)
    return ids, alone, got, decoder.largest


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit_attention", "fused_attention"])
def test_batched_window_rows_match_lone_runs(gpt_oss_kit, explicit):
    """The decoder with rows joined by hand: three at once, one after the ring has wrapped;
    the third leaves early, so the late row joins a batch of two and the last row ends alone."""
    kit = gpt_oss_kit
    pattern = [{"layer_name": SLIDING, "component": "attention_pattern"}, {"layer_name": FULL, "component": "attention_scores"}]
    runs = [
        ("ab", pattern, None, dict(max_tokens=14, temp=0.0)),  # 2 prompt tokens: far inside the window at first
        ("a prompt longer than the window of eight", [{"layer_name": SLIDING, "component": "attention_scores"}, {"layer_name": 2, "component": "residual"}],
         [steer(kit.arch_info.d_model, 4, layer=1, scale=4.0)], dict(max_tokens=12, temp=0.8, seed=2)),
        ("x y z", pattern[:1], [{"layer_name": SLIDING, "component": "z", "op": "zero", "heads": [1]}], dict(max_tokens=5, temp=0.0)),  # leaves early
        ("joins late, after the ring wrapped", pattern, None, dict(max_tokens=9, temp=1.0, seed=11)),
    ]
    if not explicit:
        runs = [(p, _fused(h), e, kw) for p, h, e, kw in runs]
    # 9 steps: past the window of 8 for every row, the batch's ring has wrapped
    ids, _, got, largest = decode_batched_and_alone(kit, runs, waits=[0, 0, 0, 9])
    assert len(ids[0]) < 8 < len(ids[1]) and largest == 3
    if not explicit:
        return
    # The sliding layer's pattern really is a window: 8 key columns, the latest positions.
    last = got[0][-1][2]["layers.0.attention_pattern"][-1]
    assert len(last[2]) == 8 and last[2] == list(range(last[1][0] - 7, last[1][0] + 1))


def test_rows_join_a_lone_row_whose_ring_has_wrapped(gpt_oss_kit):
    """A row decodes alone past its window (a plain RotatingKVCache in ring order), then one
    joins it (merge) and, a few steps later, another joins the batch of two (extend)."""
    pattern = [{"layer_name": SLIDING, "component": "attention_pattern"}]
    runs = [
        ("the first row, alone for a while", pattern, None, dict(max_tokens=22, temp=0.0)),
        ("ab", pattern + [{"layer_name": 3, "component": "residual"}], None, dict(max_tokens=12, temp=0.9, seed=8)),
        ("a third row arrives", pattern, [steer(gpt_oss_kit.arch_info.d_model, 6, layer=0, scale=3.0)], dict(max_tokens=6, temp=0.0)),
    ]
    assert decode_batched_and_alone(gpt_oss_kit, runs, waits=[0, 11, 3])[3] == 3


def test_the_default_model_batches_past_its_window_of_128():
    """The embedded default model (window 128): a 124-token prompt decodes past its window
    next to a short one, a pattern on its sliding layer in both; tolerances as above."""
    import mlx_engine

    kit = mlx_engine.load_model("default")
    assert kit.arch_info.sliding_window == 128 and kit.arch_info.layer_types[SLIDING] == "sliding_attention"
    long_prompt = [int(t) for t in np.random.default_rng(0).integers(10, kit.arch_info.vocab_size - 10, size=124)]
    pattern = [{"layer_name": SLIDING, "component": "attention_pattern"}]
    runs = [
        (long_prompt, pattern, None, dict(max_tokens=10, temp=0.0)),
        ("def encode(self, obj):", pattern + [{"layer_name": 3, "component": "residual"}], None, dict(max_tokens=8, temp=0.7, seed=4)),
    ]
    _, _, got, largest = decode_batched_and_alone(kit, runs, waits=[0, 0])
    assert largest == 2
    keys = [c[2] for c in got[0][-1][2]["layers.0.attention_pattern"]]
    assert len(keys[-1]) == 128 and keys[-1][0] > 0  # the window has moved past position 0


@pytest.fixture(scope="module")
def server(gpt_oss_checkpoint, tmp_path_factory):
    srv = start_server(
        ["--model", str(gpt_oss_checkpoint), "--max-batch-size", "8", "--prompt-cache-mb", "64", "--threads", "24", "--capture-store-items", "64"],
        tmp_path_factory.mktemp("batching_window") / "server.log",
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def requests_mix(d_model: int) -> list[dict[str, Any]]:
    """Requests that differ in every per-request setting, with captures on sliding and full layers."""
    return [
        chat("Write the json encoder.", max_tokens=20, temperature=0, activation_hooks=[{"layer_name": SLIDING, "component": "attention_pattern"}]),
        chat("Write the json encoder.", max_tokens=20, temperature=0, activation_hooks=[{"layer_name": 2, "component": "residual"}], interventions=[steer(d_model, 0)]),
        chat("def decode(self, s):", max_tokens=16, temperature=0.9, seed=7, activation_hooks=[{"layer_name": FULL, "component": "attention_scores"}, {"layer_name": 0, "component": "mlp"}]),
        chat("class Encoder(object):", max_tokens=24, temperature=0.7, top_p=0.9, seed=123),
        chat("import json", max_tokens=12, temperature=1.0, seed=5, interventions=[{"layer_name": SLIDING, "component": "z", "op": "zero", "heads": [0, 2]}],
             activation_hooks=[{"layer_name": 2, "component": "attention_pattern"}, {"layer_name": 3, "component": "router"}]),
    ]


def test_concurrent_requests_on_a_sliding_window_model_each_get_what_they_get_alone(server, gpt_oss_kit):
    bodies = requests_mix(gpt_oss_kit.arch_info.d_model)
    alone = [post(server, b) for b in bodies]
    assert tokens(alone[0]) != tokens(alone[1]), "the steering must change the continuation"
    before = health(server)["batching"]
    assert before["largest_batch"] == 1

    batched = run_concurrently(server, bodies)
    for a, b in zip(alone, batched):
        assert_same_run(a, b)
    window = [c for c in batched[0]["activations"]["layers.0.attention_pattern"] if c["step"] > 0]
    assert window and all(len(c["key_positions"]) <= 8 for c in window)

    after = health(server)["batching"]
    assert after["largest_batch"] > 1, after
    assert after["batched_steps"] > before["batched_steps"]
    assert after["solo_generations"] == before["solo_generations"] == 0
    assert after["rows"] == 0


def test_a_repeated_prompt_longer_than_the_window_reuses_its_cache(server):
    """The sliding layers' rotating caches are stored and restored too: same output as uncached."""
    body = chat("A prompt that runs well past the window of eight: def encode(self, obj):", max_tokens=10, temperature=0)
    uncached = post(server, {**body, "activation_hooks": [{"layer_name": 0, "component": "residual"}]})
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    n_prompt = uncached["usage"]["prompt_tokens"]
    assert n_prompt > 8
    post(server, body)  # stored (the capture of every position above reused nothing and stored its cache)
    again = post(server, body)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    assert tokens(again)[0] == tokens(uncached)[0]
    np.testing.assert_allclose(
        [t["logprob"] for t in again["choices"][0]["logprobs"]["content"]],
        [t["logprob"] for t in uncached["choices"][0]["logprobs"]["content"]],
        atol=LOGPROB_ATOL, rtol=0,
    )


def test_a_stored_prefix_restores_a_rotating_cache_in_its_chunked_prefill_state(gpt_oss_kit):
    """A prompt prefilled in chunks keeps only its sliding layers' last positions: a later
    prompt reuses a prefix only where every window is still held, and gets the lone logits."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_engine.generation.prefix_cache import PrefixCache

    model = gpt_oss_kit.model
    prompt = list(range(5, 45))  # 40 tokens, prefilled in chunks of 16: the rotating caches trim
    cont = prompt[:35] + [50, 51, 52]

    def prefill(tokens: list[int], cache: list, chunk: int = 16) -> mx.array:
        for s in range(0, len(tokens), chunk):
            logits = model(mx.array(tokens[s : s + chunk])[None], cache=cache)
        return logits[0, -1]

    stored = make_prompt_cache(model)
    prefill(prompt, stored)
    cache = PrefixCache(max_bytes=1 << 26)
    cache.store("m", prompt, stored)
    assert len(cache) == 1
    # The sliding layers hold positions [25, 40) (7 kept + the last chunk of 8): a prefix
    # shorter than 25 + 7 = 32 would need a position they no longer hold.
    assert cache.lookup("m", prompt[:31] + [60, 61], limit=32) == (0, None)
    n, restored = cache.lookup("m", cont, limit=len(cont) - 1)
    assert n == 35
    got = prefill(cont[n:], restored)
    want = prefill(cont, make_prompt_cache(model))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def mistral_kit(tmp_path_factory):
    import tiny_checkpoints as tc

    import mlx_engine

    path, _ = tc.build_llama(tmp_path_factory.mktemp("mistral"), variant="mistral")
    return mlx_engine.load_model(path)


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit_attention", "fused_attention"])
def test_mistral_rows_with_a_window_on_every_layer_match_lone_runs(mistral_kit, explicit):
    """Mistral: every layer has the window of 8 (a RotatingKVCache each); the same proof as above."""
    from mlx_engine.generation.batch import model_batchable

    kit = mistral_kit
    assert kit.arch_info.sliding_window == 8 and model_batchable(kit)
    pattern = [{"layer_name": 0, "component": "attention_pattern"}, {"layer_name": 2, "component": "attention_scores"}]
    runs = [
        ("ab", pattern, None, dict(max_tokens=14, temp=0.0)),
        ("a prompt longer than the window of eight", [{"layer_name": 1, "component": "residual"}],
         [steer(kit.arch_info.d_model, 5, layer=1, scale=4.0)], dict(max_tokens=12, temp=0.8, seed=2)),
        ("x y z", pattern[:1], [{"layer_name": 1, "component": "z", "op": "zero", "heads": [1]}], dict(max_tokens=5, temp=0.0)),
        ("joins late, after the ring wrapped", pattern, None, dict(max_tokens=9, temp=1.0, seed=11)),
    ]
    if not explicit:
        runs = [(p, _fused(h), e, kw) for p, h, e, kw in runs]
    assert decode_batched_and_alone(kit, runs, waits=[0, 0, 0, 9])[3] == 3
