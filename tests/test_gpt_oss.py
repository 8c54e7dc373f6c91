"""Native gpt-oss against transformers (float32, eager) and mlx-lm, on tiny random checkpoints.

The checkpoint has 4 layers alternating sliding (window 8) and full attention, 4 experts
with 2 per token, sinks, and YaRN with `truncate: false` as gpt-oss ships it. Logits of
these models are of order 1 to 5; every tolerance below is absolute.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.models.rope_utils import initialize_rope
from mxfp4 import dequantize_mxfp4, quantize_mxfp4
from safetensors.numpy import load_file, save_file
from tiny_checkpoints import build_gpt_oss, load_reference

from mlx_engine import load_model
from mlx_engine.tools.convert import quantize_checkpoint
from mlx_engine.models.gpt_oss import Model, ModelArgs
from mlx_engine.models.rope import YarnRoPE, make_rope

LOGIT_TOL = 1e-4  # ours vs transformers / mlx-lm, float32 on CPU
PATHS_TOL = 1e-5  # our explicit attention vs our fused attention
WINDOW = 8
VOCAB = 384
LONG = 220

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def token_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n)


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def our_logits(model: nn.Module, ids: np.ndarray, cache: Any = None) -> np.ndarray:
    out = model(mx.array(ids)[None], cache=cache)
    return np.array(out[0].astype(mx.float32))


def their_logits(ref: torch.nn.Module, ids: np.ndarray, **kwargs: Any) -> Any:
    with torch.no_grad():
        return ref(torch.tensor(ids)[None], **kwargs)


@contextmanager
def armed(points: dict[str, Any], fn: Callable) -> Iterator[None]:
    """Arm the given HookPoints with `fn` for the duration of the block."""
    for hp in points.values():
        hp.fn = fn
    try:
        yield
    finally:
        for hp in points.values():
            hp.fn = None


def copy_with_config(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def to_old_rope_keys(config: dict, truncate: bool) -> None:
    """rope_parameters -> rope_theta + rope_scaling, as original gpt-oss and MLX conversions write them."""
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {**params, "truncate": truncate}


def set_truncate(config: dict, truncate: bool) -> None:
    config["rope_parameters"] = {**config["rope_parameters"], "truncate": truncate}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The reference's tiny matmuls gain nothing from threads, and on a busy machine torch's
    spinning workers starve MLX; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path, _ = build_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "float")
    return path


@pytest.fixture(scope="module")
def kit(ckpt):
    return load_model(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt):
    return load_reference(ckpt, "GptOssForCausalLM")


@pytest.fixture(scope="module")
def truncated_ckpt(ckpt, tmp_path_factory) -> Path:
    """The same weights with YaRN's correction range rounded (what mlx-lm always does)."""
    return copy_with_config(ckpt, tmp_path_factory.mktemp("gpt_oss") / "truncated", lambda c: set_truncate(c, True))


def write_original_layout(src: Path, dst: Path, truncate: bool) -> Path:
    """OpenAI's Hub layout: experts as MXFP4 *_blocks/*_scales [E, out, in/32, ...], old rope keys."""
    dst.mkdir(parents=True)
    weights = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            # transformers keeps x @ W ([E, in, out]); the original layout is [E, out, in].
            blocks, scales = quantize_mxfp4(np.ascontiguousarray(v.swapaxes(-1, -2)))
            weights[f"{k}_blocks"], weights[f"{k}_scales"] = blocks, scales
        else:
            weights[k] = v
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    to_old_rope_keys(config, truncate)
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def original_ckpts(ckpt, tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return {t: write_original_layout(ckpt, root / f"truncate_{t}", truncate=t) for t in (False, True)}


# ---------------------------------------------------------------- prompt logits and hidden states


@pytest.mark.parametrize("n_tokens", [13, LONG])
def test_prompt_logits_and_hidden_states_match_transformers(kit, ref, n_tokens):
    """Logits and transformers' hidden states (embedding, block outputs, final norm) within 1e-4."""
    ids = token_ids(n_tokens, seed=n_tokens)
    captured: dict[str, mx.array] = {}

    def record(hp, x, ctx):
        captured[hp.name] = x
        return x

    points = kit.model.hook_points()
    wanted = {k: points[k] for k in ("embedding", "final_norm")}
    wanted.update({f"layers.{i}.residual": points[f"layers.{i}.residual"] for i in range(3)})
    with armed(wanted, record):
        ours = our_logits(kit.model, ids)
    theirs = their_logits(ref, ids, output_hidden_states=True)

    assert ours.shape == (n_tokens, VOCAB)
    assert max_diff(ours, theirs.logits[0]) <= LOGIT_TOL
    assert max_diff(captured["embedding"][0], theirs.hidden_states[0][0]) <= LOGIT_TOL
    # transformers' last entry is the final norm's output; the others are block outputs.
    for i in range(3):
        assert max_diff(captured[f"layers.{i}.residual"][0], theirs.hidden_states[i + 1][0]) <= LOGIT_TOL
    assert max_diff(captured["final_norm"][0], theirs.hidden_states[4][0]) <= LOGIT_TOL


# ---------------------------------------------------------------- decoding through the cache


def test_decode_steps_match_transformers_past_the_window_wrap(kit, ref):
    """12-token prefill, then 24 one-token steps: the rotating cache (size 8) wraps 3 times."""
    ids = token_ids(36, seed=1)
    cache = kit.model.make_cache()
    prefill = our_logits(kit.model, ids[:12], cache)
    assert max_diff(prefill, their_logits(ref, ids[:12]).logits[0]) <= LOGIT_TOL
    for t in range(12, 36):
        ours = our_logits(kit.model, ids[t : t + 1], cache)[-1]
        theirs = their_logits(ref, ids[: t + 1]).logits[0, -1]
        assert max_diff(ours, theirs) <= LOGIT_TOL, f"step at position {t}"
    sliding = cache[0]
    assert isinstance(sliding, RotatingKVCache) and sliding.offset == 36 and sliding.keys.shape[2] == WINDOW


def test_greedy_generation_matches_transformers(kit, ref):
    from transformers import GenerationConfig

    prompt = token_ids(10, seed=2)
    cache = kit.model.make_cache()
    logits = kit.model(mx.array(prompt)[None], cache=cache)
    ours = []
    for _ in range(32):
        token = int(mx.argmax(logits[0, -1]).item())
        ours.append(token)
        logits = kit.model(mx.array([[token]]), cache=cache)

    config = GenerationConfig(
        do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=ref.config.pad_token_id
    )
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompt)[None], generation_config=config)[0, len(prompt) :].tolist()
    assert len(theirs) == 32
    assert ours == theirs


def test_chunked_prefill_matches_transformers(kit, ref):
    """Prefill in chunks of 7 (multi-token updates of a rotating cache that already holds keys),
    on the fused and on the explicit path."""
    ids = token_ids(30, seed=10)
    theirs = their_logits(ref, ids).logits[0].numpy()
    patterns = {k: v for k, v in kit.model.hook_points().items() if k.endswith("attention_pattern")}
    for arm in (False, True):
        cache = kit.model.make_cache()
        with armed(patterns if arm else {}, lambda hp, x, ctx: x):
            chunks = [our_logits(kit.model, ids[i : i + 7], cache) for i in range(0, 30, 7)]
        assert max_diff(np.concatenate(chunks), theirs) <= LOGIT_TOL, f"explicit={arm}"


# ---------------------------------------------------------------- explicit attention path


def run_steps(model: nn.Module, ids: np.ndarray, n_prefill: int) -> list[np.ndarray]:
    cache = model.make_cache()
    out = [our_logits(model, ids[:n_prefill], cache)]
    for t in range(n_prefill, len(ids)):
        out.append(our_logits(model, ids[t : t + 1], cache))
    return out


def test_explicit_attention_equals_fused(kit):
    """Arming every attention_pattern switches all layers to the explicit path; logits agree."""
    ids = token_ids(36, seed=3)
    fused = run_steps(kit.model, ids, 20)
    patterns = {k: v for k, v in kit.model.hook_points().items() if k.endswith("attention_pattern")}
    assert len(patterns) == 4
    with armed(patterns, lambda hp, x, ctx: x):
        explicit = run_steps(kit.model, ids, 20)
    for step, (a, b) in enumerate(zip(fused, explicit)):
        assert max_diff(a, b) <= PATHS_TOL, f"step {step}"


def test_attention_pattern_matches_transformers(kit, ref):
    """Our pattern rows, mapped to absolute key positions, equal transformers' attentions;
    each row sums to 1 minus the sink's share."""
    ids = token_ids(30, seed=4)
    captured: dict[str, list] = {}

    def record(hp, x, ctx):
        captured.setdefault(hp.name, []).append((x, ctx["key_positions"]))
        return x

    points = kit.model.hook_points()
    names = ("layers.0.attention_pattern", "layers.0.attention_scores", "layers.1.attention_pattern")
    wanted = {k: points[k] for k in names}
    cache = kit.model.make_cache()
    with armed(wanted, record):
        our_logits(kit.model, ids[:20], cache)
        for t in range(20, 30):
            our_logits(kit.model, ids[t : t + 1], cache)
    theirs = their_logits(ref, ids, output_attentions=True).attentions
    sinks = np.array(kit.model.layers[0].self_attn.sinks)

    for layer in (0, 1):
        steps = captured[f"layers.{layer}.attention_pattern"]
        assert len(steps) == 11
        # Prefill: all 20 keys in order, the sliding layer masked outside its window.
        pattern, positions = steps[0]
        assert np.array_equal(np.array(positions), np.arange(20))
        assert max_diff(pattern[0], theirs[layer][0, :, :20, :20]) <= LOGIT_TOL
        # Decode steps past the wrap: columns are the keys this layer sees.
        for k, (pattern, positions) in enumerate(steps[1:]):
            t = 20 + k
            positions = np.array(positions)
            expected_keys = np.arange(t - WINDOW + 1, t + 1) if layer == 0 else np.arange(t + 1)
            assert sorted(positions.tolist()) == expected_keys.tolist()
            row = theirs[layer][0, :, t, : t + 1].numpy()
            assert max_diff(pattern[0, :, 0], row[:, positions]) <= LOGIT_TOL
            # Keys outside the window get no weight in transformers either.
            assert np.abs(np.delete(row, positions, axis=-1)).max(initial=0.0) == 0.0

    # Rows sum to 1 - sink mass, the sink mass computed from our captured scores.
    steps = zip(captured["layers.0.attention_pattern"], captured["layers.0.attention_scores"])
    for (pattern, _), (scores, _) in steps:
        s = np.array(scores[0], dtype=np.float64)
        m = np.maximum(s.max(-1, keepdims=True), sinks[:, None, None])
        sink_mass = np.exp(sinks[:, None] - m[..., 0]) / (
            np.exp(s - m).sum(-1) + np.exp(sinks[:, None] - m[..., 0])
        )
        assert max_diff(np.array(pattern[0]).sum(-1), 1.0 - sink_mass) <= 1e-5
        assert sink_mass.max() > 0.01  # the sinks really take a share here


# ---------------------------------------------------------------- experts and router


def test_moe_layer_matches_transformers_with_clamping():
    """One MoE layer from transformers' own module, with non-default swiglu alpha/limit and
    weights large enough that the clamps bite, through our sanitize (float layout)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    dims = dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=1)
    alpha, limit = 1.3, 0.8
    theirs = GptOssMLP(GptOssConfig(**dims, swiglu_alpha=alpha, swiglu_limit=limit)).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model = Model(
        ModelArgs(
            **dims,
            swiglu_alpha=alpha,
            swiglu_limit=limit,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=16,
        )
    )
    prefix = "model.layers.0.mlp."
    weights = model.sanitize({prefix + k: mx.array(v.numpy()) for k, v in theirs.state_dict().items()})
    mlp = model.layers[0].mlp
    mlp.load_weights([(k[len(prefix) :], v) for k, v in weights.items()], strict=True)

    x = np.random.default_rng(11).normal(size=(1, 40, 64)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.tensor(x))[0].numpy()
        gate_up = torch.tensor(x[0]) @ theirs.experts.gate_up_proj[0] + theirs.experts.gate_up_proj_bias[0]
    assert (gate_up.abs() > limit).float().mean() > 0.3  # the clamps are exercised
    assert max_diff(mlp(mx.array(x), model.layers[0].hooks), expected) <= 1e-5


def test_router_capture_matches_transformers_and_edits_take_effect(kit, ref):
    ids = token_ids(16, seed=5)
    captured: dict[str, Any] = {}

    def record(hp, x, ctx):
        captured[hp.name] = (x, ctx)
        return x

    points = kit.model.hook_points()
    with armed({"r": points["layers.2.router"], "m": points["layers.2.mlp_in"], "o": points["layers.2.mlp"]}, record):
        our_logits(kit.model, ids)
    theirs = their_logits(ref, ids, output_router_logits=True).router_logits[2].numpy()
    logits, ctx = captured["layers.2.router"]
    assert max_diff(logits[0], theirs) <= LOGIT_TOL
    top2 = np.sort(np.argsort(-theirs, axis=-1)[:, :2], axis=-1)
    assert np.array_equal(np.sort(np.array(ctx["experts"][0]), axis=-1), top2)
    assert max_diff(np.array(ctx["weights"]).sum(-1), 1.0) <= 1e-6

    # Negating the router logits must route each token to its two least likely experts.
    mlp_in = captured["layers.2.mlp_in"][0]
    unedited_out = np.array(captured["layers.2.mlp"][0])
    with armed({"r": points["layers.2.router"]}, lambda hp, x, ctx: -x), armed({"o": points["layers.2.mlp"]}, record):
        our_logits(kit.model, ids)
    edited_out = np.array(captured["layers.2.mlp"][0])
    mlp = kit.model.layers[2].mlp
    flipped = -mlp.router(mlp_in)
    chosen = mx.array(np.argsort(-np.array(flipped), axis=-1)[..., :2])
    weights = mx.softmax(mx.take_along_axis(flipped, chosen, axis=-1), axis=-1)
    expected = (mlp.experts(mlp_in, chosen) * weights[..., None]).sum(axis=-2)
    assert max_diff(edited_out, expected) <= 1e-5
    assert max_diff(edited_out, unedited_out) > 1e-1


# ---------------------------------------------------------------- YaRN truncate


def test_yarn_frequencies_honour_truncate(ref):
    """Our YaRN (truncate false) has transformers' frequencies; mlx-lm's rounds the
    correction range, which is our truncate=True."""
    scaling = {k: v for k, v in ref.config.rope_parameters.items() if k != "rope_theta"}
    assert scaling["truncate"] is False
    theirs = 1.0 / ref.model.rotary_emb.inv_freq.numpy()
    ours = make_rope(16, 150000.0, scaling, 131072)
    assert isinstance(ours, YarnRoPE)
    assert np.allclose(np.array(ours._freqs), theirs, rtol=1e-5)
    assert abs(ours.mscale - ref.model.rotary_emb.attention_scaling) < 1e-7

    mlx_lm_rope = initialize_rope(16, 150000.0, False, scaling, 131072)
    rounded = make_rope(16, 150000.0, {**scaling, "truncate": True}, 131072)
    assert np.allclose(np.array(mlx_lm_rope._freqs), np.array(rounded._freqs), rtol=1e-6)
    assert np.abs(np.array(mlx_lm_rope._freqs) / theirs - 1).max() > 0.1


def test_yarn_truncate_changes_logits(kit, ref, truncated_ckpt):
    """At 220 tokens the rounded correction range moves logits by far more than our tolerance."""
    ids = token_ids(LONG, seed=LONG)
    theirs = their_logits(ref, ids).logits[0]
    assert max_diff(our_logits(kit.model, ids), theirs) <= LOGIT_TOL
    rounded = our_logits(load_model(truncated_ckpt).model, ids)
    assert max_diff(rounded, theirs) > 1e-2
    # ...and transformers with truncate true agrees with ours with truncate true.
    ref_rounded = load_reference(truncated_ckpt, "GptOssForCausalLM")
    assert max_diff(rounded, their_logits(ref_rounded, ids).logits[0]) <= LOGIT_TOL


def test_model_args_read_rope_parameters_directly(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    args = ModelArgs.from_dict(config)  # no normalize_rope_config beforehand
    assert args.rope_theta == 150000.0
    assert args.rope_scaling["rope_type"] == "yarn" and args.rope_scaling["truncate"] is False
    assert args.layer_types == ["sliding_attention", "full_attention"] * 2
    rope = Model(args).layers[0].self_attn.rope
    assert isinstance(rope, YarnRoPE)


# ---------------------------------------------------------------- original MXFP4 layout


def test_mxfp4_codec_agrees_with_mlx_and_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = np.random.default_rng(6).normal(scale=0.15, size=(3, 8, 64)).astype(np.float32)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2)
    values = dequantize_mxfp4(blocks, scales)

    q, s = mx.quantize(mx.array(w), group_size=32, bits=4, mode="mxfp4")
    assert np.array_equal(np.array(q).view(np.uint8).reshape(blocks.shape), blocks)
    assert np.array_equal(np.array(s), scales)
    mlx_values = mx.dequantize(
        mx.array(blocks).view(mx.uint32).flatten(-2),
        mx.array(scales),
        group_size=32,
        bits=4,
        mode="mxfp4",
        dtype=mx.float32,
    )
    assert np.array_equal(np.array(mlx_values), values)
    # transformers dequantizes to its [E, in, out] layout.
    tf_values = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32)
    assert np.array_equal(tf_values.numpy(), values.swapaxes(-1, -2))
    # Round to nearest: no value is further than half FP4's largest gap (2) times its block scale.
    block_scale = np.exp2(scales.astype(np.float32) - 127)
    assert (np.abs(values - w).reshape(3, 8, 2, 32) <= block_scale[..., None]).all()


def test_original_mxfp4_layout_matches_transformers(original_ckpts):
    """transformers dequantizes the MXFP4 experts itself on CPU; we keep them packed."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    path = original_ckpts[False]
    kit = load_model(path)
    experts = kit.model.layers[0].mlp.experts
    assert experts.gate_proj.mode == "mxfp4" and experts.gate_proj.group_size == 32
    assert kit.model.args.rope_scaling["truncate"] is False

    ref = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", quantization_config=Mxfp4Config(dequantize=True)
    ).eval()
    for n in (13, LONG):
        ids = token_ids(n, seed=7 + n)
        assert max_diff(our_logits(kit.model, ids), their_logits(ref, ids).logits[0]) <= LOGIT_TOL


def test_original_mxfp4_layout_matches_mlx_lm(original_ckpts):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = original_ckpts[True]
    ours = load_model(path).model
    theirs, _ = mlx_lm_load_model(path)
    ids = token_ids(LONG, seed=8)
    assert max_diff(our_logits(ours, ids), our_logits(theirs, ids)) <= LOGIT_TOL


# ---------------------------------------------------------------- MLX conversions


def dequantized_copy(model: Model) -> Model:
    """The same model in float: every quantized weight through mx.dequantize."""
    weights = dict(tree_flatten(model.parameters()))
    floats = {}
    for name, module in model.named_modules():
        if "scales" not in module:
            continue
        floats[f"{name}.weight"] = mx.dequantize(
            module["weight"], module["scales"], module.get("biases"), module.group_size, module.bits, module.mode
        )
        for part in ("weight", "scales", "biases"):
            weights.pop(f"{name}.{part}", None)
    weights.update(floats)
    float_model = Model(model.args)
    float_model.load_weights(list(weights.items()), strict=True)
    return float_model


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 64)])
def test_mlx_conversion_matches_dequantized_and_mlx_lm(truncated_ckpt, tmp_path, bits, group_size):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = quantize_checkpoint(truncated_ckpt, tmp_path / "mlx", bits=bits, group_size=group_size)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and "rope_parameters" not in config
    assert any(k.endswith("experts.gate_proj.scales") for k in mx.load(str(path / "model.safetensors")))

    model = load_model(path).model
    assert model.layers[1].mlp.experts.gate_proj.bits == bits
    assert model.layers[1].mlp.experts.gate_proj.group_size == group_size
    assert model.layers[1].mlp.router.bits == 8
    assert model.layers[1].self_attn.q_proj.group_size == group_size

    # The folder holds the source weights: each dequantized tensor is within two quantization
    # steps of the source (affine steps are the group's range / (2**bits - 1)), the rest exact.
    source = dict(tree_flatten(load_model(truncated_ckpt).model.parameters()))
    dequantized = dequantized_copy(model)
    restored = dict(tree_flatten(dequantized.parameters()))
    assert restored.keys() == source.keys()
    for name, w in source.items():
        bound = 2 * 2 * float(mx.abs(w).max()) / (2**bits - 1) if name.endswith(".weight") else 0.0
        assert max_diff(restored[name], w) <= bound, name

    ids = token_ids(LONG, seed=9)
    ours = our_logits(model, ids)
    assert max_diff(ours, our_logits(dequantized, ids)) <= LOGIT_TOL
    theirs, _ = mlx_lm_load_model(path)
    assert max_diff(ours, our_logits(theirs, ids)) <= LOGIT_TOL


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_named(ckpt, tmp_path, damage):
    path = tmp_path / "broken"
    shutil.copytree(ckpt, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file at all")
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_model(path)
    assert "model.safetensors" in str(err.value)


def test_hook_points_and_arch_info(kit):
    points = kit.model.hook_points()
    assert list(points)[0] == "embedding" and list(points)[-1] == "final_norm"
    assert len(points) == 2 + 4 * 16  # 13 sites of the contract and z, plus resid_mid, expert_pre, expert_post
    assert all(hp.name == name and hp.fn is None for name, hp in points.items())
    info = kit.model.arch_info
    assert (info.n_experts, info.experts_per_token, info.sliding_window) == (4, 2, WINDOW)
    assert info.layer_types == ("sliding_attention", "full_attention") * 2
    assert (info.n_heads, info.n_kv_heads, info.head_dim, info.block_prefix) == (4, 2, 16, "model.layers")
