"""POST /v1/completions/with_activations on a real server (tiny Llama, ephemeral port): a raw prompt in,
OpenAI's text_completion out, with the captures of the chat route's shape.

- The captures equal those of the engine run in this process on the same token ids:
  `create_generator_with_activations` step by step (same loop, same chunks: 1e-6 absolute), and
  `mlx_engine.run_with_cache` over the prompt plus the generated tokens, one forward with every
  position at once (the route's steps joined along the position axis; 1e-4 absolute, the float32
  rounding between a KV-cached step and a full forward).
- A prompt given as text and as its token ids answer the same; streamed, the first chunk names
  the capture and the prompt's tokens, each token's chunk carries its step's captures, and the
  streamed captures and text equal the whole answer's.
- `interventions` ride along: the captures show the edited model, as run_with_cache with the same
  intervention does. An attached SAE's features are captured by `"sae": id` (equal to the SAE's own
  `encode` of the captured residual, |diff| <= 1e-5 (1 + |value|)) and edited by it (zeroed features
  read back as zero).
- Bad input gets an OpenAI-style 4xx: chat messages instead of a prompt, no hooks anywhere, an
  unknown hook, an empty prompt, echo.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx_engine  # noqa: F401, I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
import requests
from neuroscope_server import running_server
from test_server_http import sse_json

from mlx_engine.wire.codec import decode_capture

PROMPT = "The cat sat on the"
HOOKS = [{"layer_name": 1, "component": "residual"}, {"layer_name": 0, "component": "mlp"}]
ROUTE = "/v1/completions/with_activations"
MAX_TOKENS = 5


SAE_ID = "layers.1.residual.sae_features"


@pytest.fixture(scope="module")
def sae_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A standard SAE of random weights on the tiny Llama's layer-1 residual (d_model 64, 32 features)."""
    import mlx.core as mx

    from mlx_engine.sae.formats import save_sae
    from mlx_engine.sae.model import SAE, SAEConfig

    rng = np.random.default_rng(0)
    decoder = rng.standard_normal((32, 64)).astype(np.float32)
    decoder /= np.linalg.norm(decoder, axis=1, keepdims=True)
    arrays = {"W_enc": decoder.T.copy(), "W_dec": decoder, "b_enc": np.full(32, 0.1, np.float32), "b_dec": np.zeros(64, np.float32)}
    root = tmp_path_factory.mktemp("sae-root")
    save_sae(SAE(SAEConfig("standard", 64, 32, hook_name="blocks.1.hook_resid_post"), {k: mx.array(v) for k, v in arrays.items()}), root / "resid1")
    return root


@pytest.fixture(scope="module")
def url(llama_checkpoint: Path, sae_root: Path) -> Iterator[str]:
    with running_server(model=str(llama_checkpoint), sae_roots=(sae_root,)) as base:
        yield base


def post(url: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(url + ROUTE, json=body, timeout=120)


def joined(captures: list[dict[str, Any]]) -> np.ndarray:
    """A hook's per-step captures [T_step, d] as one array over every position, in step order."""
    assert [c["step"] for c in captures] == list(range(len(captures)))
    return np.concatenate([decode_capture(c) for c in captures], axis=0)


def test_captures_equal_the_engine_on_the_same_tokens(url: str, llama_kit) -> None:
    tokens = mlx_engine.tokenize(llama_kit, PROMPT)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "activation_hooks": HOOKS, "activation_format": "base64"}
    answer = post(url, body)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    expected = list(mlx_engine.create_generator_with_activations(llama_kit, tokens, HOOKS, max_tokens=MAX_TOKENS, temp=0.0))
    assert got["object"] == "text_completion" and got["id"].startswith("cmpl-")
    assert got["choices"][0]["text"] == "".join(r.text for r, _ in expected)
    assert got["choices"][0]["finish_reason"] == "length" and got["usage"]["completion_tokens"] == MAX_TOKENS
    assert got["prompt_token_ids"] == tokens and got["prompt_tokens_text"] == [llama_kit.tokenizer.decode([t]) for t in tokens]
    generated = [r.token for r, _ in expected]
    assert got["generated_token_ids"] == generated and got["capture_id"].startswith("cap-")
    assert set(got["activations"]) == {"layers.1.residual", "layers.0.mlp"}
    for hook_id, wire in got["activations"].items():
        assert len(wire) == MAX_TOKENS and wire[0]["positions"] == [0, len(tokens)]
        for c, (_, step) in zip(wire, expected):
            np.testing.assert_allclose(decode_capture(c), np.array(step[hook_id][0].array), rtol=0, atol=1e-6)
    # One forward over the prompt and every generated token but the last (never fed back).
    cache = mlx_engine.run_with_cache(llama_kit, tokens + generated[:-1], HOOKS)
    for hook_id, wire in got["activations"].items():
        np.testing.assert_allclose(joined(wire), np.array(cache[hook_id]), rtol=0, atol=1e-4)
    by_ids = post(url, {**body, "prompt": tokens}).json()
    assert by_ids["generated_token_ids"] == generated and by_ids["choices"][0]["text"] == got["choices"][0]["text"]
    for hook_id in got["activations"]:
        np.testing.assert_array_equal(joined(by_ids["activations"][hook_id]), joined(got["activations"][hook_id]))
    plain = requests.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}, timeout=120).json()
    assert plain["choices"][0]["text"] == got["choices"][0]["text"] and "activations" not in plain and "capture_id" not in plain


def test_streamed_chunks_carry_each_steps_captures(url: str, llama_kit) -> None:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "activation_hooks": HOOKS, "activation_format": "json",
            "logprobs": 1, "stream_options": {"include_usage": True}}
    whole = post(url, {**body, "activation_format": "base64", "stream_options": None}).json()
    chunks = sse_json(url, ROUTE, {**body, "stream": True})
    first, steps, final, usage = chunks[0], chunks[1:-2], chunks[-2], chunks[-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert first["prompt_token_ids"] == whole["prompt_token_ids"] and first["prompt_tokens_text"] == whole["prompt_tokens_text"]
    assert first["capture_id"].startswith("cap-") and final["capture_id"] == first["capture_id"]
    assert final["choices"][0]["finish_reason"] == "length" and usage["choices"] == [] and usage["usage"]["completion_tokens"] == MAX_TOKENS
    assert [c["token_id"] for c in steps] == whole["generated_token_ids"]
    assert [c["token_text"] for c in steps] == [llama_kit.tokenizer.decode([c["token_id"]]) for c in steps]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert [c["choices"][0]["logprobs"]["tokens"] for c in steps] == [[t] for t in whole["generated_tokens_text"]]
    for hook_id, wire in whole["activations"].items():
        streamed = [c["activations"][hook_id][0] for c in steps]
        assert [c["encoding"] for c in streamed] == ["json"] * MAX_TOKENS
        np.testing.assert_allclose(joined(streamed), joined(wire), rtol=0, atol=1e-6)  # json decimals vs base64 bytes


def test_interventions_edit_the_captured_run(url: str, llama_kit) -> None:
    edit = [{"layer_name": 0, "component": "mlp", "op": "zero", "positions": "all"}]
    tokens = mlx_engine.tokenize(llama_kit, PROMPT)
    got = post(url, {"prompt": tokens, "max_tokens": 3, "temperature": 0, "activation_hooks": HOOKS,
                     "activation_format": "base64", "interventions": edit}).json()
    assert got["interventions"][0]["op"] == "zero"
    assert not np.any(joined(got["activations"]["layers.0.mlp"]))
    cache = mlx_engine.run_with_cache(llama_kit, tokens + got["generated_token_ids"][:-1], HOOKS, interventions=edit)
    np.testing.assert_allclose(joined(got["activations"]["layers.1.residual"]), np.array(cache["layers.1.residual"]), rtol=0, atol=1e-4)
    unedited = mlx_engine.run_with_cache(llama_kit, tokens + got["generated_token_ids"][:-1], HOOKS)
    assert not np.allclose(np.array(unedited["layers.1.residual"]), np.array(cache["layers.1.residual"]), atol=1e-3)


def test_sae_features_are_captured_and_edited_by_their_id(url: str, sae_root: Path) -> None:
    import mlx.core as mx

    from mlx_engine.sae.formats import load_sae

    model_id = requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    attached = requests.post(f"{url}/v1/models/{model_id}/saes", json={"source": "resid1"}, timeout=120)
    assert attached.status_code == 200, attached.text
    try:
        hooks = [{"sae": SAE_ID}, "layers.1.residual"]
        body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "activation_hooks": hooks, "activation_format": "base64"}
        got = post(url, body).json()
        features, residual = joined(got["activations"][SAE_ID]), joined(got["activations"]["layers.1.residual"])
        want = np.array(load_sae(str(sae_root / "resid1")).encode(mx.array(residual)))
        assert features.shape == (residual.shape[0], 32) and np.count_nonzero(features) > 0
        assert np.all(np.abs(features - want) <= 1e-5 * (1 + np.abs(want)))
        edited = post(url, {**body, "interventions": [{"sae": SAE_ID, "op": "zero", "indices": [0, 1, 2]}]}).json()
        assert not np.any(joined(edited["activations"][SAE_ID])[:, :3])
    finally:
        requests.delete(f"{url}/v1/models/{model_id}/saes/{SAE_ID}", timeout=120)


@pytest.mark.parametrize("body, status, param, code", [
    ({"messages": [{"role": "user", "content": "hi"}], "activation_hooks": HOOKS}, 400, None, None),
    ({"prompt": PROMPT}, 400, "activation_hooks", "no_hooks"),
    ({"prompt": PROMPT, "activation_hooks": [{"layer_name": 99, "component": "residual"}]}, 400, "activation_hooks", None),
    ({"prompt": "", "activation_hooks": HOOKS}, 400, None, None),
    ({"prompt": PROMPT, "echo": True, "activation_hooks": HOOKS}, 400, None, None),
    ({"prompt": PROMPT, "activation_hooks": HOOKS, "activation_format": "npy"}, 400, None, None),
])
def test_bad_input_is_an_openai_style_4xx(url: str, body: dict[str, Any], status: int, param, code) -> None:
    answer = post(url, {"max_tokens": 2, **body})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    if code is not None:
        assert error["code"] == code
