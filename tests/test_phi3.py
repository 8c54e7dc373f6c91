"""Native Phi-3 against transformers (float32, eager attention) on the same weights.

Two tiny checkpoints written by transformers 5 (3 layers, hidden 64, 4 query heads over 2 KV heads,
head_dim 16, weights N(0, 0.15), norms 1 + N(0, 0.15)):
- "window": plain RoPE on half of each head (partial_rotary_factor 0.5, written only inside
  `rope_parameters`, where mlx-lm 0.32 does not look) and a sliding window of 8 on every layer,
  so the rotating caches wrap during decode;
- "longrope": LongRoPE over 3/4 of each head with distinct short and long factors,
  original_max_position_embeddings 16 of 256 (attention factor sqrt(1 + ln 16 / ln 16)), and tied
  embeddings, as Phi-4-mini ships.

Tolerances (float32 on both sides, logits O(1)-O(10)): every component and every logit within
atol = rtol = 1e-4 of transformers, the 4-bit conversion included (its reference carries the
dequantized weights); greedy tokens exactly equal.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine.hooks.components import ComponentType
from mlx_engine.hooks.names import ResolvedHook
from mlx_engine.models.phi3 import ModelArgs
from mlx_engine.tools.convert import quantize_checkpoint
from test_llama import dequantized_parameters

ATOL = RTOL = 1e-4
WINDOW = 8
THRESHOLD = 16  # LongRoPE's original_max_position_embeddings
PROMPT_LEN = 24  # longer than the window and the LongRoPE threshold
DECODE_STEPS = 4  # component captures: the prompt plus 3 decode steps
PREFILL, PAST_WRAP = 20, WINDOW + 20  # decode steps: 20 past the rotating caches' wrap
GREEDY = 32

CONFIGS: dict[str, dict[str, Any]] = {
    "window": dict(
        sliding_window=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
    "longrope": dict(
        max_position_embeddings=256,
        original_max_position_embeddings=THRESHOLD,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0],
            "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 12.0],
        },
    ),
}


def build_phi3(out_dir: Path, seed: int = 0, **overrides: Any) -> tuple[Path, Any]:
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = tc.build_tokenizer(out_dir)
    config = Phi3Config(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )
    config._attn_implementation = "eager"
    model = Phi3ForCausalLM(config)
    tc.spread_weights(model, seed=seed)
    model.eval()
    return tc._save(model, tokenizer, out_dir), model


# --- the reference: transformers' tensors at every site -----------------------------------------

Pick = Callable[[tuple, dict, Any], torch.Tensor]


def first_input(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def output(args: tuple, kwargs: dict, out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def phi3_taps(model: Any) -> list[tuple[Any, str, Pick]]:
    """(module, reference key, what to read): `{i}.{component}`, `{i}.{component}.input` for sublayer inputs."""
    inter = model.config.intermediate_size
    taps: list[tuple[Any, str, Pick]] = [(model.model.embed_tokens, "embedding", output), (model.model.norm, "final_norm", output)]
    for i, block in enumerate(model.model.layers):
        taps += [
            (block, f"{i}.residual", output),
            (block, f"{i}.residual.input", first_input),
            (block.input_layernorm, f"{i}.layernorm", output),
            (block.input_layernorm, f"{i}.layernorm.input", first_input),
            (block.self_attn, f"{i}.attention", output),
            (block.self_attn, f"{i}.attention.input", first_input),
            (block.post_attention_layernorm, f"{i}.resid_mid", first_input),
            (block.mlp, f"{i}.mlp", output),
            (block.mlp, f"{i}.mlp.input", first_input),
            (block.mlp.gate_up_proj, f"{i}.mlp_pre", lambda a, k, o: o[..., :inter]),
            (block.mlp.down_proj, f"{i}.mlp_post", first_input),
        ]
    return taps


def record_reference(model: Any, ids: list[int], taps: list[tuple[Any, str, Pick]], module_name: str) -> dict[str, np.ndarray]:
    """One transformers forward over `ids`, every tapped tensor and the attention's insides recorded.

    q/k/v, scores and probabilities come from an attention function registered with transformers'
    AttentionInterface that records what its own eager attention receives.
    """
    store: dict[str, np.ndarray] = {}
    eager = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}").eager_attention_forward
    handles = []
    for module, key, pick in taps:
        def hook(m: Any, args: tuple, kwargs: dict, out: Any, key: str = key, pick: Pick = pick) -> None:
            store[key] = pick(args, kwargs, out).detach()[0].float().numpy()

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    for i, block in enumerate(model.model.layers):
        block.self_attn._capture_layer = i

    def recording_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any):
        i = module._capture_layer
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        store[f"{i}.query"], store[f"{i}.key"], store[f"{i}.value"] = (t[0].numpy() for t in (query, key, value))
        scores = torch.matmul(query, k.transpose(2, 3)) * kwargs["scaling"]
        store[f"{i}.attention_scores"] = scores[0].numpy()
        store[f"{i}.allowed"] = (mask[:, :, :, : k.shape[-2]] == 0)[0].expand_as(scores[0]).numpy()
        out, weights = eager(module, query, key, value, mask, **kwargs)
        store[f"{i}.attention_pattern"] = weights[0].numpy()
        store[f"{i}.z"] = out[0].transpose(0, 1).numpy()  # [H, T, D]
        return out, weights

    AttentionInterface.register("recording_eager", recording_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("recording_eager", eager_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "recording_eager"
    try:
        with torch.no_grad():
            store["logits"] = model(torch.tensor([ids])).logits[0].numpy()
    finally:
        model.config._attn_implementation = previous
        for h in handles:
            h.remove()
    return store


def listed_hooks(kit: Any) -> list[Any]:
    """Every component the listing offers at every layer (inputs too), the embedding and the final norm.

    The final norm goes as a resolved hook: a model that offers no per-layer `layernorm` (OLMo 2)
    cannot request it by name (see names.py), and this proves the site itself either way.
    """
    listing = mlx_engine.ActivationHookManager(kit).hook_points()
    hooks: list[Any] = [{"layer_name": "embedding", "component": "embedding"}]
    hooks.append(ResolvedHook("final_norm", "final_norm", None, "final_norm", ComponentType.LAYERNORM, False))
    for layer in listing["layers"]:
        for component, desc in layer["components"].items():
            hooks.append({"layer_name": layer["name"], "component": component})
            if desc["supports_input"]:
                hooks.append({"layer_name": layer["name"], "component": component, "capture_input": True, "capture_output": False})
    return hooks


def compare(capture: Any, ref: dict[str, np.ndarray]) -> None:
    """One capture against the reference rows it covers (scores and patterns column by key position)."""
    ours = np.array(capture.array, dtype=np.float32)
    start, end = capture.positions
    what = f"{capture.hook_id} step {capture.step} rows {start}:{end}"
    if capture.layer is None:
        np.testing.assert_allclose(ours, ref[capture.layer_name][start:end], atol=ATOL, rtol=RTOL, err_msg=what)
        return
    i, comp = capture.layer, capture.component
    if comp in ("attention_scores", "attention_pattern"):
        keys = np.array(capture.key_positions)
        full = ref[f"{i}.{comp}"][:, start:end]
        expected, allowed = full[:, :, keys], ref[f"{i}.allowed"][:, start:end][:, :, keys]
        if comp == "attention_scores":
            assert np.all(np.isneginf(ours[~allowed])), what
            np.testing.assert_allclose(ours[allowed], expected[allowed], atol=ATOL, rtol=RTOL, err_msg=what)
        else:
            np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)
            rest = np.setdiff1d(np.arange(full.shape[-1]), keys)
            assert np.abs(full[:, :, rest]).max(initial=0.0) < 1e-6, what  # no mass outside the reported keys
        return
    expected = ref[f"{i}.{comp}.input" if capture.is_input else f"{i}.{comp}"]
    expected = expected[:, start:end] if comp in ("query", "key", "value", "z") else expected[start:end]
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)


def check_every_site(kit: Any, reference: Any, taps: list, module_name: str, prompt: list[int]) -> list[Any]:
    """Capture every offered site through the real generation loop; compare each with transformers.

    Returns the captures, for checks of their own."""
    hooks = listed_hooks(kit)
    steps = list(mlx_engine.create_generator_with_activations(kit, prompt, hooks, max_tokens=DECODE_STEPS))
    generated = [r.token for r, _ in steps]
    ref = record_reference(reference, prompt + generated[:-1], taps, module_name)
    captures = []
    for result, activations in steps:
        assert set(activations) == {r.hook_id for r in kit.resolve_hooks(hooks)}
        for hook_captures in activations.values():
            for capture in hook_captures:
                assert capture.step == result.step
                compare(capture, ref)
                captures.append(capture)
    assert generated == ref["logits"][len(prompt) - 1 :].argmax(-1).tolist()
    return captures


# --- shared helpers ------------------------------------------------------------------------------


def text_ids(kit: Any, n: int) -> list[int]:
    ids = mlx_engine.tokenize(kit, tc.training_text())
    assert len(ids) >= n
    return ids[:n]


def their_logits(ref: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


def our_steps(model: nn.Module, ids: list[int], prefill: int) -> np.ndarray:
    """Logits at positions prefill-1 .. len-1: one prefill pass through the model's caches, then a token a step."""
    cache = model.make_cache()
    rows = [np.array(model(mx.array(ids[:prefill])[None], cache=cache)[0, -1])]
    for t in range(prefill, len(ids)):
        rows.append(np.array(model(mx.array(ids[t : t + 1])[None], cache=cache)[0, -1]))
    return np.stack(rows)


def greedy_matches_transformers(kit: Any, reference: torch.nn.Module, prompt: list[int]) -> None:
    ours = [r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=GREEDY)]
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY, min_new_tokens=GREEDY, eos_token_id=None, pad_token_id=0
        )
    assert ours == out[0, len(prompt) :].tolist()


def dequantized_reference(kit: Any, float_path: Path, cls_name: str) -> torch.nn.Module:
    """transformers carrying exactly the weights our quantized model computes with (names coincide)."""
    reference = tc.load_reference(float_path, cls_name)
    state = {k: np.array(v.astype(mx.float32)) for k, v in dequantized_parameters(kit.model)}
    if kit.model.args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return reference


def rewrite_config(src: Path, dst: Path, edit: Callable[[dict], dict]) -> Path:
    """A copy of the checkpoint with config.json passed through `edit`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    (dst / "config.json").write_text(json.dumps(edit(tc.read_config(src)), indent=2))
    return dst


# --- fixtures and tests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phi3")


@pytest.fixture(scope="module")
def paths(root: Path) -> dict[str, Path]:
    return {name: build_phi3(root / name, **overrides)[0] for name, overrides in CONFIGS.items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request: pytest.FixtureRequest, paths: dict[str, Path]) -> tuple[str, Path, Any, torch.nn.Module]:
    path = paths[request.param]
    return request.param, path, mlx_engine.load_model(path), tc.load_reference(path, "Phi3ForCausalLM")


def test_config_is_read_from_rope_parameters(case) -> None:
    name, _, kit, _ = case
    args = kit.model.args
    assert kit.native and args.head_dim == 16
    if name == "window":
        assert args.partial_rotary_factor == 0.5 and args.rotary_dim == 8 and args.rope_type == "default"
        assert kit.arch_info.layer_types == ("sliding_attention",) * 3 and kit.arch_info.sliding_window == WINDOW
        assert [type(c).__name__ for c in kit.model.make_cache()] == ["RotatingKVCache"] * 3
        assert "lm_head" in kit.model
    else:
        assert args.partial_rotary_factor == 0.75 and args.rotary_dim == 12 and args.rope_type == "longrope"
        rope = kit.model.layers[0].self_attn.rope
        assert rope.threshold == THRESHOLD and rope.attention_factor == pytest.approx(2**0.5)
        assert kit.arch_info.layer_types == ("full_attention",) * 3 and "lm_head" not in kit.model
    listing = mlx_engine.ActivationHookManager(kit).hook_points()
    assert listing["d_mlp"] == 128 and not listing["post_norms"]
    assert {"layernorm", "mlp_pre", "mlp_post", "resid_mid", "z"} <= set(listing["components"])
    assert not {"router", "attention_pre_norm", "mlp_pre_norm"} & set(listing["components"])


def test_every_component_every_layer_matches_transformers(case) -> None:
    name, _, kit, reference = case
    prompt = text_ids(kit, PROMPT_LEN)
    captures = check_every_site(kit, reference, phi3_taps(reference), "phi3", prompt)
    if name == "window":
        decode_patterns = [c for c in captures if c.component == "attention_pattern" and c.step > 0]
        assert decode_patterns and all(len(c.key_positions) == WINDOW for c in decode_patterns)


def test_decode_past_the_window_wrap_matches_transformers(case) -> None:
    """A prompt past the window (and the LongRoPE threshold), then 28 greedy steps, each step's
    logits against a transformers forward over the whole sequence; then 32 greedy tokens."""
    _, _, kit, reference = case
    prompt = text_ids(kit, PREFILL)
    tokens = [r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=PAST_WRAP)]
    ids = prompt + tokens
    ours = our_steps(kit.model, ids, PREFILL)
    theirs = their_logits(reference, ids)[PREFILL - 1 :]
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)
    assert tokens == ours[:-1].argmax(-1).tolist()
    greedy_matches_transformers(kit, reference, prompt)


def test_longrope_switches_factors_as_transformers_does(paths: dict[str, Path]) -> None:
    """Below the threshold the short factors apply (a prefix forward is the reference); a cached
    decode that crosses it equals transformers' cached forward step by step. (transformers'
    `generate` recomputes the whole sequence at the crossing; this engine, like its cached
    forward, keeps the earlier positions as computed.)"""
    kit, reference = mlx_engine.load_model(paths["longrope"]), tc.load_reference(paths["longrope"], "Phi3ForCausalLM")
    ids = text_ids(kit, 2 * THRESHOLD + 8)
    prefill = THRESHOLD // 2
    ours = our_steps(kit.model, ids, prefill)
    for t in range(prefill - 1, THRESHOLD):  # sequences of at most THRESHOLD tokens
        np.testing.assert_allclose(ours[t - prefill + 1], their_logits(reference, ids[: t + 1])[-1], atol=ATOL, rtol=RTOL)
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        rows = [reference(torch.tensor([ids[:prefill]]), cache=cache, use_cache=True).logits[0, -1].numpy()]
        for t in range(prefill, len(ids)):
            rows.append(reference(torch.tensor([ids[t : t + 1]]), cache=cache, use_cache=True).logits[0, -1].numpy())
    np.testing.assert_allclose(ours, np.stack(rows), atol=ATOL, rtol=RTOL)
    # The long factors differ enough from the short ones that a wrong choice would show.
    assert np.abs(their_logits(reference, ids)[THRESHOLD - 1] - ours[THRESHOLD - prefill]).max() > 1e-2


@pytest.mark.parametrize(
    "name",
    [
        "longrope",
        "window",
    ],
)
def test_4bit_conversion_matches_dequantized_transformers(name: str, paths: dict[str, Path], root: Path) -> None:
    kit = mlx_engine.load_model(quantize_checkpoint(paths[name], root / f"{name}-q4g32", bits=4, group_size=32))
    assert kit.config["quantization"]["bits"] == 4 and kit.config["quantization"]["group_size"] == 32
    assert isinstance(kit.model.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    reference = dequantized_reference(kit, paths[name], "Phi3ForCausalLM")
    prompt = text_ids(kit, PREFILL)
    tokens = [r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=2 * DECODE_STEPS)]
    ids = prompt + tokens
    np.testing.assert_allclose(our_steps(kit.model, ids, PREFILL), their_logits(reference, ids)[PREFILL - 1 :], atol=ATOL, rtol=RTOL)


def to_transformers4(config: dict) -> dict:
    """The layout transformers 4 wrote: rope_theta and rope_scaling (LongRoPE as "longrope"),
    partial_rotary_factor at the top level; and no tie_word_embeddings where it is Phi3Config's default."""
    config = dict(config)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params["rope_theta"]
    config["partial_rotary_factor"] = params["partial_rotary_factor"]
    if params["rope_type"] == "longrope":
        config["rope_scaling"] = {"type": "longrope", "short_factor": params["short_factor"], "long_factor": params["long_factor"]}
    else:
        config["rope_scaling"] = None
    if config.get("tie_word_embeddings") is False:
        del config["tie_word_embeddings"]
    return config


def test_transformers4_config_layout_loads_to_the_same_logits(case, root: Path) -> None:
    name, path, kit, reference = case
    old = rewrite_config(path, root / f"{name}-t4", to_transformers4)
    assert "rope_parameters" not in tc.read_config(old)
    old_kit = mlx_engine.load_model(old)
    assert old_kit.model.args.rotary_dim == kit.model.args.rotary_dim
    ids = text_ids(kit, 2 * THRESHOLD)
    ours = np.array(old_kit.model(mx.array([ids]))[0])
    np.testing.assert_allclose(ours, their_logits(reference, ids), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(ours, their_logits(tc.load_reference(old, "Phi3ForCausalLM"), ids), atol=ATOL, rtol=RTOL)


def test_older_longrope_names_and_unsupported_types() -> None:
    """"su" and "yarn" are LongRoPE's older names in Phi-3 configs (transformers 5 renames both);
    any other RoPE type is refused, as transformers' Phi3Config refuses it."""
    base = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=4, vocab_size=384)
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    for old_name in ("su", "yarn"):
        args = ModelArgs.from_dict({**base, "rope_scaling": {"type": old_name, **factors}})
        assert args.rope_type == "longrope" and args.rotary_dim == 16
    with pytest.raises(ValueError, match="'default' or 'longrope'"):
        ModelArgs.from_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="short_factor must list 6"):
        ModelArgs.from_dict({**base, "partial_rotary_factor": 0.75, "rope_scaling": {"type": "longrope", **factors}})
