"""Native OLMo 2 against transformers (float32, eager attention) on the same weights.

Two tiny checkpoints written by transformers 5 (3 layers, hidden 64, 4 query heads over 2 KV heads,
weights N(0, 0.15), norms 1 + N(0, 0.15)):
- "base": head_dim 16, plain RoPE, an untied head (Olmo2Config's default);
- "bias-tied": bias on every attention projection, tied embeddings, head_dim 32 (not 64 / 4, so
  q_norm/k_norm span 128 and 64 features), linear RoPE scaling (factor 2).

OLMo 2 has post-norms only: `attention` / `mlp` are the normed sublayer outputs added to the
stream, `attention_pre_norm` / `mlp_pre_norm` the raw ones, and there is no pre-attention norm, so
no `layernorm` component in a block.

Tolerances (float32 on both sides, logits O(1)-O(10)): every component and every logit within
atol = rtol = 1e-4 of transformers, the 4-bit conversion included (its reference carries the
dequantized weights); attention + mlp == residual - resid_pre within 1e-5; greedy tokens equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine.hooks.names import HookSpecError
from mlx_engine.tools.convert import quantize_checkpoint
from test_phi3 import (
    ATOL,
    DECODE_STEPS,
    RTOL,
    check_every_site,
    dequantized_reference,
    first_input,
    greedy_matches_transformers,
    output,
    our_steps,
    rewrite_config,
    text_ids,
    their_logits,
)

ADD_TOL = 1e-5  # attention + mlp against residual - resid_pre, both ours
PROMPT_LEN, PREFILL, DECODE = 20, 12, 24

CONFIGS: dict[str, dict[str, Any]] = {
    "base": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "bias-tied": dict(
        attention_bias=True,
        tie_word_embeddings=True,
        head_dim=32,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
}


def build_olmo2(out_dir: Path, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    tokenizer = tc.build_tokenizer(out_dir)
    config = Olmo2Config(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )
    config._attn_implementation = "eager"
    model = Olmo2ForCausalLM(config)
    tc.spread_weights(model, seed=seed)
    model.eval()
    return tc._save(model, tokenizer, out_dir), model


def olmo2_taps(model: Any) -> list[tuple[Any, str, Any]]:
    """Each site where transformers computes it: the post-norms' outputs are what the block adds."""
    taps: list[tuple[Any, str, Any]] = [(model.model.embed_tokens, "embedding", output), (model.model.norm, "final_norm", output)]
    for i, block in enumerate(model.model.layers):
        taps += [
            (block, f"{i}.residual", output),
            (block, f"{i}.residual.input", first_input),
            (block.self_attn, f"{i}.attention_pre_norm", output),
            (block.post_attention_layernorm, f"{i}.attention", output),
            (block.mlp, f"{i}.resid_mid", first_input),
            (block.mlp, f"{i}.mlp.input", first_input),
            (block.mlp, f"{i}.mlp_pre_norm", output),
            (block.post_feedforward_layernorm, f"{i}.mlp", output),
            (block.mlp.gate_proj, f"{i}.mlp_pre", output),
            (block.mlp.down_proj, f"{i}.mlp_post", first_input),
        ]
    return taps


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("olmo2")


@pytest.fixture(scope="module")
def paths(root: Path) -> dict[str, Path]:
    return {name: build_olmo2(root / name, **overrides)[0] for name, overrides in CONFIGS.items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest, paths: dict[str, Path]) -> tuple[str, Path, Any, torch.nn.Module]:
    path = paths[request.param]
    return request.param, path, mlx_engine.load_model(path), tc.load_reference(path, "Olmo2ForCausalLM")


def test_listing_offers_post_norm_sites_and_no_layernorm(case) -> None:
    name, _, kit, _ = case
    assert kit.native and kit.model.args.head_dim == (32 if name == "bias-tied" else 16)
    assert ("lm_head" in kit.model) == (name == "base")
    listing = mlx_engine.ActivationHookManager(kit).hook_points()
    components = set(listing["components"])
    assert listing["post_norms"] and any("sandwich norms" in n for n in listing["notes"])
    assert {"attention_pre_norm", "mlp_pre_norm", "mlp_pre", "mlp_post", "resid_mid", "z"} <= components
    assert "layernorm" not in components and "router" not in components
    assert all("layernorm" not in layer["components"] for layer in listing["layers"])
    for request in (
        {"layer_name": 0, "component": "layernorm"},
        {"layer_name": "blocks.0.ln1.hook_normalized"},
        {"layer_name": "model.layers.0.input_layernorm"},
    ):
        with pytest.raises(HookSpecError, match="'layernorm' is not offered"):
            kit.resolve_hooks([request])
    with pytest.raises(HookSpecError, match="'layernorm' is not offered"):
        mlx_engine.run_with_cache(kit, [1, 2, 3], [], interventions=[{"layer_name": 0, "component": "layernorm", "op": "zero"}])
    # The attention reads the block input (capture `residual` with capture_input); the MLP reads resid_mid.
    assert not listing["layers"][0]["components"]["attention"]["supports_input"]
    with pytest.raises(HookSpecError, match="no pre-attention norm"):
        kit.resolve_hooks([{"layer_name": 0, "component": "attention", "capture_input": True}])
    assert listing["layers"][0]["components"]["mlp"]["supports_input"]
    points = kit.hook_points
    assert "layers.1.layernorm" not in points and points["layers.1.mlp_in"] is points["layers.1.resid_mid"]


def test_every_component_every_layer_matches_transformers(case) -> None:
    """Every offered site, prompt and decode steps, against transformers; and on this sandwich-norm
    model what is added to the stream sums to the block's change: attention + mlp = residual - resid_pre."""
    _, _, kit, reference = case
    prompt = text_ids(kit, PROMPT_LEN)
    captures = check_every_site(kit, reference, olmo2_taps(reference), "olmo2", prompt)
    by_site = {(c.layer, c.component, c.is_input, c.step): np.array(c.array, dtype=np.float64) for c in captures}
    for layer in range(kit.arch_info.num_layers):
        for step in range(DECODE_STEPS):
            added = by_site[(layer, "attention", False, step)] + by_site[(layer, "mlp", False, step)]
            change = by_site[(layer, "residual", False, step)] - by_site[(layer, "residual", True, step)]
            np.testing.assert_allclose(added, change, atol=ADD_TOL, rtol=0)
            # The MLP's input is the stream itself, and the post-norms change the outputs.
            np.testing.assert_array_equal(by_site[(layer, "mlp", True, step)], by_site[(layer, "resid_mid", False, step)])
            assert np.abs(by_site[(layer, "attention", False, step)] - by_site[(layer, "attention_pre_norm", False, step)]).max() > 1e-2


def test_decode_and_greedy_tokens_match_transformers(case) -> None:
    """24 decode steps through our caches, each step's logits against a transformers forward over the
    whole sequence; then 32 greedy tokens through the real generation loop against transformers' generate."""
    _, _, kit, reference = case
    prompt = text_ids(kit, PREFILL)
    tokens = [r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=DECODE)]
    ids = prompt + tokens
    ours = our_steps(kit.model, ids, PREFILL)
    np.testing.assert_allclose(ours, their_logits(reference, ids)[PREFILL - 1 :], atol=ATOL, rtol=RTOL)
    assert tokens == ours[:-1].argmax(-1).tolist()
    greedy_matches_transformers(kit, reference, prompt)


def test_4bit_conversion_matches_dequantized_transformers(case, root: Path) -> None:
    name, path, _, _ = case
    kit = mlx_engine.load_model(quantize_checkpoint(path, root / f"{name}-q4g32", bits=4, group_size=32))
    assert kit.config["quantization"]["bits"] == 4 and kit.config["quantization"]["group_size"] == 32
    assert isinstance(kit.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    reference = dequantized_reference(kit, path, "Olmo2ForCausalLM")
    prompt = text_ids(kit, PREFILL)
    tokens = [r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=2 * DECODE_STEPS)]
    ids = prompt + tokens
    np.testing.assert_allclose(our_steps(kit.model, ids, PREFILL), their_logits(reference, ids)[PREFILL - 1 :], atol=ATOL, rtol=RTOL)
    # The quantized model is a different model: it must differ from the float checkpoint.
    assert np.abs(their_logits(reference, ids) - their_logits(tc.load_reference(path, "Olmo2ForCausalLM"), ids)).max() > 1e-2


def to_transformers4(config: dict) -> dict:
    """The layout transformers 4 wrote: rope_theta and rope_scaling; and no tie_word_embeddings where
    it is Olmo2Config's default (false, where mlx-lm 0.32 assumes true)."""
    config = dict(config)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params["rope_theta"]
    config["rope_scaling"] = {"type": params["rope_type"], "factor": params["factor"]} if params["rope_type"] != "default" else None
    if config.get("tie_word_embeddings") is False:
        del config["tie_word_embeddings"]
    return config


def test_transformers4_config_layout_loads_to_the_same_logits(case, root: Path) -> None:
    name, path, kit, reference = case
    old = rewrite_config(path, root / f"{name}-t4", to_transformers4)
    config = tc.read_config(old)
    assert "rope_parameters" not in config and ("tie_word_embeddings" in config) == (name == "bias-tied")
    old_kit = mlx_engine.load_model(old)
    assert ("lm_head" in old_kit.model) == (name == "base")
    ids = text_ids(kit, 2 * PREFILL)
    ours = np.array(old_kit.model(mx.array([ids]))[0])
    np.testing.assert_allclose(ours, their_logits(reference, ids), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(ours, their_logits(tc.load_reference(old, "Olmo2ForCausalLM"), ids), atol=ATOL, rtol=RTOL)
