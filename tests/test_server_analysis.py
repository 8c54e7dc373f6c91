"""POST /v1/analysis/* on a real server (tiny Llama, ephemeral port): the analyses over HTTP.

- logit_lens, attribution, heads and patching answer what mlx_engine.analysis returns in-process
  on the same checkpoint (a second kit in the test thread): token ids and strings exactly,
  numbers within 1e-5 relative + 1e-6 absolute (the same float32 maths, run on another thread).
- Independent references: the lens's last row is transformers' own next-token distribution
  (float32 eager, top-k probabilities within 1e-4); restoring the last layer's residual at the
  read position recovers the clean run exactly (fraction 1 within 1e-4); the attribution's terms
  sum to its total (1e-4).
- Bounded work and bad input: prompts above the token cap, patching grids and head ablations
  above the pass cap, unknown tokens, unequal clean/corrupted lengths, unknown fields are 400s
  with an OpenAI-style body naming the problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx_engine  # noqa: F401, I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
import requests
import tiny_checkpoints as tc
import torch
from neuroscope_server import running_server
from scipy.special import softmax

from mlx_engine.analysis import lens as lens_module
from mlx_engine.analysis.attribution import default_target_foil, direct_logit_attribution
from mlx_engine.analysis.heads import head_scores
from mlx_engine.analysis.patching import activation_patching, prepare_patching
from mlx_engine.server.routes.analysis import MAX_RUNS, MAX_TOKENS

PROMPT = "The quick brown fox jumps over the lazy dog"
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def url(llama_checkpoint: Path) -> Iterator[str]:
    with running_server(model=str(llama_checkpoint)) as base:
        yield base


def post(url: str, path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{url}/v1/analysis/{path}", json=body, timeout=300)


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal structure; strings, ints, bools exactly; floats within RTOL/ATOL."""
    if isinstance(want, dict):
        assert set(got) >= set(want), (where, sorted(set(want) - set(got)))
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        if np.isnan(want):
            assert got is None, where  # JSON has no NaN: the server sends null
        else:
            assert got == pytest.approx(want, rel=RTOL, abs=ATOL), where
    else:
        assert got == want, where


def test_logit_lens_equals_the_python_api_and_transformers(url: str, llama_kit, llama_checkpoint: Path) -> None:
    answer = post(url, "logit_lens", {"prompt": PROMPT, "top_k": 4})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    want = lens_module.logit_lens(llama_kit, PROMPT, top_k=4).to_json()
    assert got["object"] == "analysis.logit_lens" and got["tokens"] == want["tokens"]
    assert_same(got, want)
    ref = tc.load_reference(llama_checkpoint, "LlamaForCausalLM")
    with torch.no_grad():
        logits = ref(torch.tensor([got["tokens"]])).logits[0].numpy().astype(np.float64)
    probs = softmax(logits, axis=-1)
    top = -np.sort(-probs, axis=-1)[:, :4]
    assert np.allclose(got["top_probs"][-1], top, atol=1e-4)
    assert got["top_ids"][-1][-1][0] == int(np.argmax(logits[-1]))


def test_attribution_equals_the_python_api_and_sums_to_its_total(url: str, llama_kit) -> None:
    got = post(url, "attribution", {"prompt": PROMPT, "position": -2}).json()
    target, foil = default_target_foil(llama_kit, PROMPT, -2)
    want = direct_logit_attribution(llama_kit, PROMPT, target, foil, position=-2).to_json()
    assert (got["target"], got["foil"]) == (target, foil)
    assert_same(got, want)
    assert got["sum_of_terms"] == pytest.approx(got["total"], abs=1e-4)
    named = post(url, "attribution", {"prompt": PROMPT, "target": target, "foil": foil}).json()
    assert_same(named, direct_logit_attribution(llama_kit, PROMPT, target, foil).to_json())


def test_head_scores_equal_the_python_api(url: str, llama_kit) -> None:
    got = post(url, "heads", {"prompt": PROMPT, "repeat_length": 8, "seed": 3, "importance": True}).json()
    want = head_scores(llama_kit, PROMPT, repeat_length=8, seed=3, importance=True, progress=False).to_json()
    assert got["repeated_tokens"] == want["repeated_tokens"]
    assert_same(got, want)
    assert got["tables"]["importance_zero"] is not None


def test_patching_equals_the_python_api_and_the_last_layer_recovers_all(url: str, llama_kit) -> None:
    clean = mlx_engine.tokenize(llama_kit, "The cat sat on the mat")
    corrupted = [*clean[:3], (clean[3] + 7) % llama_kit.arch_info.vocab_size, *clean[4:]]  # one token swapped
    body = {"clean": clean, "corrupted": corrupted, "component": "residual"}
    got = post(url, "patching", body).json()
    setup = prepare_patching(llama_kit, clean, corrupted)
    want = activation_patching(setup, "residual", progress=False).to_json()
    assert_same(got, want)
    assert got["fractions"][-1][got["position"]] == pytest.approx(1.0, abs=1e-4)
    heads = post(url, "patching", {"clean": clean, "noise_positions": [1], "component": "z", "layers": [0, 1], "seed": 2}).json()
    setup = prepare_patching(llama_kit, clean, noise_positions=[1], seed=2, components=("z",))
    assert_same(heads, activation_patching(setup, "z", layers=[0, 1], progress=False).to_json())
    assert heads["column_kind"] == "head"


@pytest.mark.parametrize("path, body, status, needle", [
    ("logit_lens", {"prompt": [5] * (MAX_TOKENS + 1)}, 400, f"at most {MAX_TOKENS}"),
    ("logit_lens", {"prompt": PROMPT, "top_k": 0}, 400, "top_k"),
    ("logit_lens", {"prompt": PROMPT, "bogus": 1}, 400, "bogus"),
    ("logit_lens", {"prompt": [10**6]}, 400, "outside the vocabulary"),
    ("attribution", {"prompt": PROMPT, "target": "no such token at all"}, 400, "is not one token"),
    ("attribution", {"prompt": PROMPT, "position": 99}, 400, "out of range"),
    ("patching", {"clean": "The cat sat", "corrupted": "A much longer corrupted prompt here"}, 400, "same number of tokens"),
    ("patching", {"clean": [5] * (MAX_RUNS // 3 + 1), "noise_positions": [0]}, 400, f"at most {MAX_RUNS}"),  # 3 layers
    ("patching", {"clean": "The cat sat"}, 400, "noise_positions"),
    ("heads", {"importance": True}, 400, "give prompt"),
    ("heads", {"prompt": PROMPT, "repeat_length": 1}, 400, "repeat_length"),
    ("logit_lens", {"model": "nope", "prompt": PROMPT}, 404, "nope"),
])
def test_bad_requests_are_4xx_with_a_reason(url: str, path: str, body: dict[str, Any], status: int, needle: str) -> None:
    answer = post(url, path, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
