"""Native Qwen 3 (dense) against transformers (float32, eager attention) on the same weights.

Tiny checkpoints written by transformers itself: 3 layers, hidden 64, 4 query heads over 2 KV
heads, head_dim 32 (not 64 / 4, so a head_dim taken from hidden / heads would fail), the per-head
q/k norms, and `use_sliding_window` with a window of 8 from `max_window_layers` = 1 up: one
forward mixes a KVCache (layer 0) with RotatingKVCaches that wrap during decode. Weights are
re-initialised N(0, 0.15) (norms 1 + N(0, 0.15)); logits are O(1)-O(10).

Tolerances (float32 on both sides): every component and the logits within atol = rtol = 1e-4 of
transformers, the 4-bit conversion included (its reference carries the dequantized weights);
attention + mlp == residual - resid_pre within 1e-5; greedy tokens exactly equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine.models.qwen3 import ModelArgs
from mlx_engine.tools.convert import quantize_checkpoint
from test_hooks_equivalence import PROMPT, Reference, all_hooks, compare

ATOL = RTOL = 1e-4
ADD_TOL = 1e-5  # attention + mlp against residual - resid_pre, both ours
WINDOW = 8
DECODE_STEPS = 4  # component captures: the prompt plus 3 decode steps
PREFILL, GREEDY = 12, 32  # GREEDY >= WINDOW + 20: 20+ steps after the rotating caches wrap
LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention"]


def build_qwen3(out_dir: Path, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    """A tiny Qwen3ForCausalLM saved by transformers 5 (rope_parameters, untied head)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tc.build_tokenizer(out_dir)
    config = Qwen3Config(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config)
    tc.spread_weights(model, seed=seed)
    model.eval()
    return tc._save(model, tokenizer, out_dir), model


def dequantized_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter of our model by its path, each quantized weight as mx.dequantize of it."""
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, np.ndarray] = {}
    for path, module in model.named_modules():
        if hasattr(module, "scales") and hasattr(module, "bits"):
            w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits, mode=module.mode)
            out[f"{path}.weight"] = np.array(w.astype(mx.float32))
            for name in ("weight", "scales", "biases"):
                params.pop(f"{path}.{name}", None)
    out.update({k: np.array(v.astype(mx.float32)) for k, v in params.items()})
    return out


def load_state(reference: torch.nn.Module, state: dict[str, np.ndarray]) -> torch.nn.Module:
    """Load `state` into the transformers model, every one of its tensors (strict)."""
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return reference


def their_logits(ref: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


def greedy(model: nn.Module, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens through the model's own caches, and the logits that chose each."""
    cache = model.make_cache()
    logits = np.array(model(mx.array(prompt)[None], cache=cache)[0, -1])
    tokens, rows = [], []
    for _ in range(n):
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = np.array(model(mx.array([tokens[-1]])[None], cache=cache)[0, -1])
    return tokens, np.stack(rows)


def text_ids(kit: Any, n: int) -> list[int]:
    ids = mlx_engine.tokenize(kit, tc.training_text())
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qwen3")


@pytest.fixture(scope="module")
def float_path(root: Path) -> Path:
    return build_qwen3(root / "float")[0]


@pytest.fixture(scope="module", params=["float", "q4g32"])
def case(request: pytest.FixtureRequest, root: Path, float_path: Path) -> tuple[str, Any, torch.nn.Module]:
    """(name, our kit, transformers carrying exactly the weights our kit computes with)."""
    reference = tc.load_reference(float_path, "Qwen3ForCausalLM")
    if request.param == "float":
        return "float", mlx_engine.load_model(float_path), reference
    kit = mlx_engine.load_model(quantize_checkpoint(float_path, root / "q4", bits=4, group_size=32))
    assert kit.config["quantization"]["bits"] == 4
    assert isinstance(kit.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    return "q4g32", kit, load_state(reference, dequantized_state(kit.model))


def test_config_selects_architecture(case: tuple[str, Any, torch.nn.Module]) -> None:
    _, kit, _ = case
    model, info = kit.model, kit.arch_info
    attn = model.layers[0].self_attn
    assert kit.native and model.args.head_dim == 32 != info.d_model // info.n_heads
    assert "bias" not in attn.q_proj and "bias" not in attn.o_proj
    assert attn.q_norm.weight.shape == (32,) and "lm_head" in model
    assert list(info.layer_types) == LAYER_TYPES and info.sliding_window == WINDOW
    assert [type(c).__name__ for c in model.make_cache()] == ["KVCache", "RotatingKVCache", "RotatingKVCache"]
    components = mlx_engine.ActivationHookManager(kit).hook_points()["components"]
    assert {"mlp_pre", "mlp_post", "z", "resid_mid"} <= set(components) and "router" not in components


def test_every_component_every_layer_matches_transformers(case: tuple[str, Any, torch.nn.Module]) -> None:
    """Prompt (longer than the window) and decode steps: every capture site, output and input."""
    name, kit, reference = case
    ids = mlx_engine.tokenize(kit, PROMPT)
    assert len(ids) > WINDOW
    hooks = all_hooks(kit)
    steps = list(mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=DECODE_STEPS))
    generated = [r.token for r, _ in steps]
    ref = Reference(reference, "qwen3")
    ref.run(ids + generated[:-1])
    n_layers = kit.arch_info.num_layers
    counts: dict[str, int] = {}
    for _, activations in steps:
        for captures in activations.values():
            for capture in captures:
                compare(capture, ref.t, n_layers)
                counts[capture.component] = counts.get(capture.component, 0) + 1
        # Not a sandwich model, but the sublayer outputs must still be exactly what is added.
        for i in range(n_layers):
            (pre,), (post,) = activations[f"layers.{i}.residual.input"], activations[f"layers.{i}.residual"]
            (att,), (mlp,) = activations[f"layers.{i}.attention"], activations[f"layers.{i}.mlp"]
            added = np.array(att.array) + np.array(mlp.array)
            np.testing.assert_allclose(added, np.array(post.array) - np.array(pre.array), atol=ADD_TOL)
    assert set(counts) >= {"query", "key", "attention_scores", "attention_pattern", "z", "mlp_pre", "mlp_post"}
    assert generated == ref.t["logits"][len(ids) - 1 :].argmax(-1).tolist()


def test_logits_past_the_window_wrap_and_greedy_tokens(case: tuple[str, Any, torch.nn.Module]) -> None:
    """32 greedy steps after a 12-token prompt (window 8): each step's logits equal transformers'
    forward over the whole sequence, and the tokens equal transformers' own greedy generate."""
    name, kit, reference = case
    prompt = text_ids(kit, PREFILL)
    tokens, ours = greedy(kit.model, prompt, GREEDY)
    assert kit.model.make_cache()[1].max_size == WINDOW < PREFILL
    theirs = their_logits(reference, prompt + tokens[:-1])[PREFILL - 1 :]
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY, min_new_tokens=GREEDY, eos_token_id=None, pad_token_id=0
        )
    assert out[0, PREFILL:].tolist() == tokens
    # The engine's own generation loop chooses the same tokens (until it meets EOS).
    api = [r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=GREEDY)]
    assert api == tokens[: len(api)] and len(api) >= 1
    if name == "q4g32":
        float_kit = mlx_engine.load_model(kit.path.parent / "float")
        gap = np.abs(np.array(float_kit.model(mx.array(prompt)[None])[0]) - np.array(kit.model(mx.array(prompt)[None])[0]))
        assert gap.max() > 1e-2, "the 4-bit model must differ from the float one for this test to mean anything"


def test_config_rules() -> None:
    """transformers' Qwen3Config defaults and its sliding-window rule."""
    base = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, intermediate_size=96, num_attention_heads=4)
    plain = ModelArgs.from_dict(base)
    assert plain.head_dim == 128 and plain.num_key_value_heads == 32 and not plain.tie_word_embeddings
    assert plain.rope_theta == 10000.0 and not plain.attention_bias
    assert plain.sliding_window is None and plain.layer_types == ["full_attention"] * 4
    off = ModelArgs.from_dict({**base, "sliding_window": 8, "use_sliding_window": False, "layer_types": ["sliding_attention"] * 4})
    assert off.sliding_window is None and off.layer_types == ["full_attention"] * 4
    on = ModelArgs.from_dict({**base, "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 2})
    assert on.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    explicit = ModelArgs.from_dict({**base, "sliding_window": 8, "use_sliding_window": True, "layer_types": LAYER_TYPES + ["full_attention"]})
    assert explicit.layer_types == LAYER_TYPES + ["full_attention"]
    rope = ModelArgs.from_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}})
    assert rope.rope_theta == 5e5 and rope.rope_scaling["rope_type"] == "yarn"


def transformers4_copy(src: Path, dst: Path, drop_tie: bool = False) -> Path:
    """The checkpoint with the config transformers 4 wrote: rope_theta / rope_scaling at the top,
    torch_dtype, no layer_types (derived from max_window_layers), optionally no tie_word_embeddings."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, torch_dtype=config.pop("dtype"), transformers_version="4.51.3")
    config.pop("layer_types", None)
    if drop_tie:
        config.pop("tie_word_embeddings")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def test_transformers4_config_and_default_tie(root: Path, float_path: Path) -> None:
    """The transformers-4 layout, with tie_word_embeddings absent (Qwen3's default: untied, so the
    lm_head tensor is kept), loads to the same logits; so does a tied checkpoint without windows."""
    ids = list(range(3, 40))
    reference = tc.load_reference(float_path, "Qwen3ForCausalLM")
    old = mlx_engine.load_model(transformers4_copy(float_path, root / "v4", drop_tie=True))
    assert not old.model.args.tie_word_embeddings and list(old.arch_info.layer_types) == LAYER_TYPES
    np.testing.assert_allclose(np.array(old.model(mx.array(ids)[None])[0]), their_logits(reference, ids), atol=ATOL, rtol=RTOL)

    tied_path, _ = build_qwen3(root / "tied", seed=1, tie_word_embeddings=True, use_sliding_window=False)
    tied = mlx_engine.load_model(tied_path)
    assert "lm_head" not in tied.model and tied.arch_info.sliding_window is None
    tied_ref = tc.load_reference(tied_path, "Qwen3ForCausalLM")
    tokens, ours = greedy(tied.model, ids[:PREFILL], 8)
    theirs = their_logits(tied_ref, ids[:PREFILL] + tokens[:-1])[PREFILL - 1 :]
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)


def test_untied_config_without_a_stored_head_is_refused(root: Path, float_path: Path) -> None:
    """Qwen3's default is an untied head: with the key absent and no lm_head.weight stored, the load
    fails naming both (transformers would initialise the head at random), rather than tying it."""
    from safetensors.numpy import load_file, save_file

    path = shutil.copytree(float_path, root / "headless")
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mlx_engine.ModelLoadError, match="lm_head.weight.*omits tie_word_embeddings"):
        mlx_engine.load_model(path)
