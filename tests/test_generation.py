"""The generation loop: finish reasons, stop strings, seeds, chunked prefill, UTF-8."""

from __future__ import annotations

import pytest
import torch

import mlx_engine
from mlx_engine.generation.text import StopStringMatcher
from tiny_checkpoints import load_reference

PROMPT = "def encode(self, obj):\n    return"


def _tokens(kit, **kw) -> list[int]:
    return [r.token for r in mlx_engine.create_generator(kit, mlx_engine.tokenize(kit, PROMPT), **kw)]


def test_greedy_matches_transformers_generate(llama_kit, llama_checkpoint) -> None:
    ids = mlx_engine.tokenize(llama_kit, PROMPT)
    ours = [r.token for r in mlx_engine.create_generator(llama_kit, ids, max_tokens=32)]
    ref = load_reference(llama_checkpoint, "LlamaForCausalLM")
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    theirs = out[0, len(ids) :].tolist()
    stop = next((i for i, t in enumerate(theirs) if t in llama_kit.eos_token_ids), None)
    assert ours == theirs[: stop + 1 if stop is not None else None]


def test_length_finish_and_counts(llama_kit) -> None:
    results = list(mlx_engine.create_generator(llama_kit, mlx_engine.tokenize(llama_kit, PROMPT), max_tokens=7))
    assert [r.finish_reason for r in results] == [None] * 6 + ["length"]
    assert results[-1].generation_tokens == 7
    assert results[-1].prompt_tokens == len(mlx_engine.tokenize(llama_kit, PROMPT))
    assert all(r.logprob <= 0 for r in results)


def test_seed_makes_sampling_repeatable(llama_kit) -> None:
    a = _tokens(llama_kit, max_tokens=16, temp=1.0, seed=7)
    b = _tokens(llama_kit, max_tokens=16, temp=1.0, seed=7)
    c = _tokens(llama_kit, max_tokens=16, temp=1.0, seed=8)
    assert a == b
    assert a != c


def test_chunked_prefill_equals_one_pass(llama_kit) -> None:
    ids = mlx_engine.tokenize(llama_kit, PROMPT * 3)
    one = list(mlx_engine.create_generator(llama_kit, ids, max_tokens=8, top_logprobs=3))
    chunked = list(mlx_engine.create_generator(llama_kit, ids, max_tokens=8, top_logprobs=3, prefill_step_size=5))
    assert [r.token for r in one] == [r.token for r in chunked]
    for a, b in zip(one, chunked):
        assert abs(a.logprob - b.logprob) < 1e-4
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs]


def test_top_logprobs_are_sorted_and_include_greedy_choice(llama_kit) -> None:
    for r in mlx_engine.create_generator(llama_kit, mlx_engine.tokenize(llama_kit, PROMPT), max_tokens=4, top_logprobs=5):
        values = [t.logprob for t in r.top_logprobs]
        assert values == sorted(values, reverse=True) and len(values) == 5
        assert r.top_logprobs[0].token == r.token
        assert abs(r.top_logprobs[0].logprob - r.logprob) < 1e-6


def test_stop_string_never_leaks(llama_kit) -> None:
    full = "".join(r.text for r in mlx_engine.create_generator(llama_kit, mlx_engine.tokenize(llama_kit, PROMPT), max_tokens=24))
    assert len(full) > 6
    stop = full[3:6]
    results = list(
        mlx_engine.create_generator(llama_kit, mlx_engine.tokenize(llama_kit, PROMPT), max_tokens=24, stop_strings=[stop])
    )
    text = "".join(r.text for r in results)
    assert text == full[: full.find(stop)]
    assert results[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    "chunks, stops, expected, hit",
    [
        (["ab", "c", "d"], ["cd"], "ab", True),
        (["hello wor", "ld!"], ["world"], "hello ", True),
        (["abc", "xyz"], ["cx"], "ab", True),
        (["ab", "c"], ["cz"], "abc", False),  # the held-back "c" comes out at flush
    ],
)
def test_stop_string_matcher(chunks: list[str], stops: list[str], expected: str, hit: bool) -> None:
    matcher = StopStringMatcher(stops)
    out, was_hit = "", False
    for chunk in chunks:
        text, was_hit = matcher.push(chunk)
        out += text
        if was_hit:
            break
    if not was_hit:
        out += matcher.flush()
    assert out == expected and was_hit == hit


def test_streamed_text_is_utf8_complete(llama_kit) -> None:
    """Deltas never split a character: their concatenation is the decoded whole."""
    ids = mlx_engine.tokenize(llama_kit, "caf\u00e9 na\u00efve \u2014 \u00fcber")
    results = list(mlx_engine.create_generator(llama_kit, ids, max_tokens=40, temp=1.0, seed=3))
    tokens = [r.token for r in results if r.token not in llama_kit.eos_token_ids]
    decoded = llama_kit.tokenizer.decode(tokens)
    assert "".join(r.text for r in results) == decoded
    for r in results[:-1]:
        assert "\ufffd" not in r.text or "\ufffd" in decoded


def test_bad_prompts(llama_kit) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        list(mlx_engine.create_generator(llama_kit, [], max_tokens=3))
    with pytest.raises(ValueError, match="out of range"):
        list(mlx_engine.create_generator(llama_kit, [10**6], max_tokens=3))
    with pytest.raises(ValueError, match="max_tokens"):
        list(mlx_engine.create_generator(llama_kit, [1, 2], max_tokens=0))
