"""Native Gemma 2 against transformers (float32, eager) on tiny checkpoints transformers writes.

The main checkpoint has 4 layers in transformers' default pattern (even layers slide, window 8),
4 query heads over 2 KV heads, head_dim 16 with query_pre_attn_scalar 24 (so the scale is not
head_dim's), tied embeddings (transformers' default) and soft-caps low enough to bite: raw
attention scores reach ~20 against a cap of 5, raw logits ~10 against a cap of 8. A second
checkpoint turns every option the other way: no soft-caps (so attention runs fused, masked by
mlx-lm's window masks), an untied head, biased attention and layer_types of its own.

Logits are of order 1 to 8 and activations up to ~60 (mlp_post); tolerances are absolute and
relative 1e-4 (float32 on both sides) unless stated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import tiny_checkpoints as tc
import torch
from mlx_lm.models.cache import RotatingKVCache
from test_hooks_equivalence import all_hooks
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

import mlx_engine
from mlx_engine.models.gemma2 import Model, ModelArgs
from mlx_engine.tools.convert import quantize_checkpoint

TOL = 1e-4  # ours vs transformers on the same weights (float32 or dequantized 4-bit)
PATHS_TOL = 1e-5  # our explicit attention vs our fused attention
WINDOW = 8
ATTN_CAP, LOGIT_CAP = 5.0, 8.0
PROMPT = "def encode(self, obj):\n    return json.dumps(obj, indent=4, sort_keys=True)\n"
PLAIN_LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]

# (component, capture_input) -> the reference tensor the capture must equal (see record_reference).
OWN_SITES = ("residual", "layernorm", "attention", "attention_pre_norm", "resid_mid", "mlp", "mlp_pre", "mlp_post",
             "mlp_pre_norm", "query", "key", "value", "z")
REF_SITE = {**{(c, False): c for c in OWN_SITES}, ("residual", True): "resid_pre", ("layernorm", True): "resid_pre",
            ("attention", True): "layernorm", ("mlp", True): "mlp_in"}


def build_gemma2(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = tc.build_tokenizer(out_dir)
    config = Gemma2Config(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 24,
        "sliding_window": WINDOW, "attn_logit_softcapping": ATTN_CAP, "final_logit_softcapping": LOGIT_CAP,
        "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **overrides,
    })
    config._attn_implementation = "eager"
    model = Gemma2ForCausalLM(config)
    tc.spread_weights(model, seed=seed)
    model.eval()
    return tc._save(model, tokenizer, out_dir)


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def our_logits(model: nn.Module, ids: Any, cache: Any = None) -> np.ndarray:
    return np.array(model(mx.array(np.asarray(ids))[None], cache=cache)[0].astype(mx.float32))


def their_logits(ref: torch.nn.Module, ids: Any) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor(np.asarray(ids))[None]).logits[0].numpy()


def weight(module: Any) -> np.ndarray:
    """A module's weight as float32, dequantized when the module is quantized."""
    if "scales" in module:
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits, mode=module.mode)
    else:
        w = module.weight
    return np.array(w.astype(mx.float32))


def dequantized_reference(kit: Any, float_path: Path) -> torch.nn.Module:
    """transformers' Gemma 2 carrying exactly the weights our 4-bit model computes with."""
    ref = tc.load_reference(float_path, "Gemma2ForCausalLM")
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied: one tensor sets both
    state = {"model.embed_tokens.weight": weight(kit.model.model.embed_tokens)}
    for i, layer in enumerate(kit.model.layers):
        parts = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
        for part, names in parts:
            for name in names:
                state[f"model.layers.{i}.{part}.{name}.weight"] = weight(getattr(getattr(layer, part), name))
    missing = set(ref.state_dict()) - set(state)
    assert all("norm" in k for k in missing - {"lm_head.weight"}), missing
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    return ref


def record_reference(model: torch.nn.Module, ids: list[int]) -> dict[str, np.ndarray]:
    """One transformers forward with every Gemma 2 site recorded: forward hooks on its modules,
    and q/k/v, soft-capped scores, probabilities and z from a recording attention function."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    store: dict[str, np.ndarray] = {}

    def save(key: str, pick: Callable[[Any, Any], Any]) -> Callable:
        def hook(module: Any, args: Any, out: Any) -> None:
            x = pick(args, out)
            store[key] = (x[0] if isinstance(x, tuple) else x)[0].detach().float().numpy()
        return hook

    inputs, output = (lambda args, out: args[0]), (lambda args, out: out)
    inner = model.model
    handles = [inner.embed_tokens.register_forward_hook(save("embedding", output))]
    handles.append(inner.norm.register_forward_hook(save("final_norm", output)))
    for i, block in enumerate(inner.layers):
        sites = [
            (block, "residual", output), (block, "resid_pre", inputs), (block.input_layernorm, "layernorm", output),
            (block.self_attn, "attention_pre_norm", output), (block.post_attention_layernorm, "attention", output),
            (block.pre_feedforward_layernorm, "resid_mid", inputs), (block.pre_feedforward_layernorm, "mlp_in", output),
            (block.mlp.gate_proj, "mlp_pre", output), (block.mlp.down_proj, "mlp_post", inputs),
            (block.mlp, "mlp_pre_norm", output), (block.post_feedforward_layernorm, "mlp", output),
        ]
        handles += [m.register_forward_hook(save(f"{i}.{site}", pick)) for m, site, pick in sites]

    def recording_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
        i = module.layer_idx
        store[f"{i}.query"], store[f"{i}.key"], store[f"{i}.value"] = (t[0].numpy() for t in (query, key, value))
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        raw = torch.matmul(query, k.transpose(2, 3)) * kwargs["scaling"]
        cap = kwargs.get("softcap")
        scores = raw if cap is None else torch.tanh(raw / cap) * cap
        allowed = (attention_mask[:, :, :, : k.shape[-2]] == 0)[0].expand_as(scores[0])
        store[f"{i}.raw_scores"], store[f"{i}.attention_scores"] = raw[0].numpy(), scores[0].numpy()
        store[f"{i}.allowed"] = allowed.numpy()
        out, probs = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        store[f"{i}.attention_pattern"], store[f"{i}.z"] = probs[0].numpy(), out[0].transpose(0, 1).numpy()
        return out, probs

    AttentionInterface.register("recording_gemma2", recording_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("recording_gemma2", eager_mask)
    model.config._attn_implementation = "recording_gemma2"
    try:
        with torch.no_grad():
            store["logits"] = model(torch.tensor([ids])).logits[0].numpy()
    finally:
        model.config._attn_implementation = "eager"
        for h in handles:
            h.remove()
    return store


def compare(capture: Any, ref: dict[str, np.ndarray]) -> None:
    ours = np.array(capture.array, dtype=np.float32)
    start, end = capture.positions
    what = f"{capture.hook_id} step {capture.step} rows {start}:{end}"
    if capture.layer is None:
        np.testing.assert_allclose(ours, ref[capture.layer_name][start:end], atol=TOL, rtol=TOL, err_msg=what)
        return
    i, comp = capture.layer, capture.component
    if comp in ("attention_scores", "attention_pattern"):
        keys = np.array(capture.key_positions)
        full = ref[f"{i}.{comp}"][:, start:end]
        ok = ref[f"{i}.allowed"][:, start:end][:, :, keys]
        if comp == "attention_scores":
            assert np.all(np.isneginf(ours[~ok])), what
            np.testing.assert_allclose(ours[ok], full[:, :, keys][ok], atol=TOL, rtol=TOL, err_msg=what)
        else:
            np.testing.assert_allclose(ours, full[:, :, keys], atol=TOL, rtol=TOL, err_msg=what)
            rest = np.setdiff1d(np.arange(full.shape[-1]), keys)
            assert np.abs(full[:, :, rest]).max(initial=0.0) < 1e-6, what  # no mass outside the reported keys
        return
    expected = ref[f"{i}.{REF_SITE[(comp, capture.is_input)]}"]
    expected = expected[:, start:end] if comp in ("query", "key", "value", "z") else expected[start:end]
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=TOL, err_msg=what)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gemma2")


@pytest.fixture(scope="module")
def ckpt(root: Path) -> Path:
    return build_gemma2(root / "float")


@pytest.fixture(scope="module")
def plain_ckpt(root: Path) -> Path:
    return build_gemma2(
        root / "plain", seed=1, attn_logit_softcapping=None, final_logit_softcapping=None,
        tie_word_embeddings=False, attention_bias=True, layer_types=PLAIN_LAYER_TYPES,
    )


@pytest.fixture(scope="module")
def float_run(ckpt: Path) -> tuple[Any, list[int], np.ndarray, np.ndarray]:
    """The float kit, the prompt's ids, and our and transformers' logits for them."""
    kit = mlx_engine.load_model(ckpt)
    ids = mlx_engine.tokenize(kit, PROMPT)
    return kit, ids, our_logits(kit.model, ids), their_logits(tc.load_reference(ckpt, "Gemma2ForCausalLM"), ids)


@pytest.fixture(scope="module", params=["float", "q4"])
def case(request: pytest.FixtureRequest, ckpt: Path, root: Path, float_run) -> tuple[str, Any, torch.nn.Module]:
    """The float checkpoint with its reference, and its 4-bit (group 32) conversion with the
    reference carrying the dequantized weights."""
    if request.param == "float":
        return "float", mlx_engine.load_model(ckpt), tc.load_reference(ckpt, "Gemma2ForCausalLM")
    q4 = root / "q4"
    if not q4.exists():
        quantize_checkpoint(ckpt, q4, bits=4, group_size=32)
    kit = mlx_engine.load_model(q4)
    assert (kit.config["quantization"]["bits"], kit.config["quantization"]["group_size"]) == (4, 32)
    assert isinstance(kit.model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(kit.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    ids = mlx_engine.tokenize(kit, PROMPT)  # a different model from the float one
    assert max_diff(our_logits(kit.model, ids), float_run[2]) > 1e-2
    return "q4", kit, dequantized_reference(kit, ckpt)


def test_every_component_every_layer_matches_transformers(case) -> None:
    """The prompt (longer than the window) and WINDOW + 4 decode steps, every site of every layer."""
    _, kit, ref = case
    ids = mlx_engine.tokenize(kit, PROMPT)
    assert len(ids) > WINDOW
    hooks = all_hooks(kit)  # every component the listing offers, outputs and inputs
    steps = list(mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=WINDOW + 4))
    generated = [r.token for r, _ in steps]
    t = record_reference(ref, ids + generated[:-1])
    seen = set()
    for result, activations in steps:
        assert set(activations) == {r.hook_id for r in kit.resolve_hooks(hooks)}
        for captures in activations.values():
            for capture in captures:
                compare(capture, t)
                seen.add((capture.component, capture.step))
                if capture.component == "attention_pattern" and capture.step > 0:  # sliding layers see the window
                    p = capture.positions[0]
                    first = p - WINDOW + 1 if kit.arch_info.window_of(capture.layer) else 0
                    assert capture.key_positions == list(range(first, p + 1)), capture.hook_id
    assert {s for _, s in seen} == set(range(WINDOW + 4))
    assert {("attention_pre_norm", WINDOW + 3), ("mlp_pre_norm", 0), ("attention_scores", 1)} <= seen
    assert generated == t["logits"][len(ids) - 1 :].argmax(-1).tolist()
    # The soft-cap bites: uncapped scores go well past the cap.
    assert np.abs(t["0.raw_scores"][t["0.allowed"]]).max() > 1.5 * ATTN_CAP


def test_decode_past_the_window_wrap_matches_transformers(case) -> None:
    """A 12-token prompt, then WINDOW + 20 greedy one-token steps through the rotating caches;
    each step's logits against one reference forward over the whole sequence."""
    _, kit, ref = case
    model = kit.model
    ids = mlx_engine.tokenize(kit, PROMPT)[:12]
    cache = model.make_cache()
    rows = [our_logits(model, ids, cache)[-1]]
    tokens = list(ids)
    for _ in range(WINDOW + 20):
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(our_logits(model, tokens[-1:], cache)[0])
    sliding = cache[0]
    assert isinstance(sliding, RotatingKVCache) and sliding.offset == len(tokens) and sliding.keys.shape[2] == WINDOW
    theirs = their_logits(ref, tokens)[len(ids) - 1 :]
    per_step = np.abs(np.stack(rows) - theirs).max(-1)
    assert per_step.max() <= TOL, per_step
    assert np.abs(theirs).max() < LOGIT_CAP  # the final soft-cap bounds the reference, and ours


def test_greedy_generation_matches_transformers(case) -> None:
    _, kit, ref = case
    ids = mlx_engine.tokenize(kit, PROMPT)
    ours = [r.token for r in mlx_engine.create_generator(kit, ids, max_tokens=32)]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=32, min_new_tokens=32, eos_token_id=None, pad_token_id=0
        )
    assert ours == out[0, len(ids) :].tolist()


def test_attention_plus_mlp_is_the_residual_update(case) -> None:
    kit = case[1]
    hooks = [{"layer_name": i, "component": c} for i in range(4) for c in ("attention", "mlp", "residual")]
    hooks += [{"layer_name": i, "component": "residual", "capture_input": True, "capture_output": False} for i in range(4)]
    acts = mlx_engine.run_with_cache(kit, PROMPT, hooks).to_numpy()
    for i in range(4):
        update = acts[f"layers.{i}.residual"] - acts[f"layers.{i}.residual.input"]
        np.testing.assert_allclose(acts[f"layers.{i}.attention"] + acts[f"layers.{i}.mlp"], update, atol=1e-5, rtol=0)


def test_plain_config_fused_attention_matches_transformers(plain_ckpt: Path) -> None:
    """No soft-caps (fused attention with window masks), untied head, biases, own layer_types:
    a chunked prompt, decode steps past the wrap, and the explicit path against the fused one."""
    kit = mlx_engine.load_model(plain_ckpt)
    model, ref = kit.model, tc.load_reference(plain_ckpt, "Gemma2ForCausalLM")
    assert model.args.layer_types == PLAIN_LAYER_TYPES and "lm_head" in model and "bias" in model.layers[0].self_attn.o_proj
    ids = mlx_engine.tokenize(kit, PROMPT * 2)
    theirs = their_logits(ref, ids)

    def runs() -> tuple[np.ndarray, np.ndarray]:
        cache = model.make_cache()
        chunked = np.concatenate([our_logits(model, ids[i : i + 7], cache) for i in range(0, len(ids), 7)])
        cache = model.make_cache()
        rows = [our_logits(model, ids[:12], cache)[-1]]
        rows += [our_logits(model, ids[t : t + 1], cache)[0] for t in range(12, len(ids))]
        return chunked, np.stack(rows)

    fused = runs()
    assert max_diff(fused[0], theirs) <= TOL and max_diff(fused[1], theirs[11:]) <= TOL
    patterns = [kit.hook_points[f"layers.{i}.attention_pattern"] for i in range(4)]
    for point in patterns:
        point.fn = lambda hp, x, ctx: x
    try:
        explicit = runs()
    finally:
        for point in patterns:
            point.fn = None
    assert max_diff(explicit[0], fused[0]) <= PATHS_TOL and max_diff(explicit[1], fused[1]) <= PATHS_TOL


def write_layout(ckpt: Path, dst: Path, layout: str) -> Path:
    """A copy of the checkpoint in another layout in use.

    v4_config: transformers 4 wrote rope_theta at the top level, `hidden_act` beside
    `hidden_activation`, no layer_types (even layers slide) and, as Google's configs do, no
    tie_word_embeddings (tied). head_copy: some tied checkpoints store lm_head.weight anyway.
    """
    from safetensors.numpy import load_file, save_file

    if dst.exists():
        return dst
    shutil.copytree(ckpt, dst)
    if layout == "v4_config":
        config = json.loads((ckpt / "config.json").read_text())
        for key in ("layer_types", "rope_parameters", "tie_word_embeddings", "use_bidirectional_attention", "dtype"):
            config.pop(key)
        config.update(rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", torch_dtype="float32",
                      cache_implementation="hybrid", transformers_version="4.42.4")
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    else:
        weights = load_file(dst / "model.safetensors")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout", ["v4_config", "head_copy"])
def test_other_layouts_load_to_the_same_logits(float_run, ckpt: Path, root: Path, layout: str) -> None:
    _, ids, ours, theirs = float_run
    other = mlx_engine.load_model(write_layout(ckpt, root / layout, layout))
    assert other.model.args.layer_types == ["sliding_attention", "full_attention"] * 2 and other.model.args.tie_word_embeddings
    assert max_diff(our_logits(other.model, ids), ours) == 0.0 and max_diff(ours, theirs) <= TOL


def test_mlx_lm_agrees_only_where_the_window_cuts_nothing(float_run, ckpt: Path) -> None:
    """mlx-lm 0.32's gemma2 attends over every key: equal to ours within the window, not past it."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    kit, ids, ours, _ = float_run
    theirs = mlx_lm_load_model(ckpt)[0]
    assert max_diff(our_logits(kit.model, ids[:WINDOW]), our_logits(theirs, ids[:WINDOW])) <= TOL
    assert max_diff(ours[WINDOW:], our_logits(theirs, ids)[WINDOW:]) > 1e-2


def test_model_args_arch_info_and_caches(float_run) -> None:
    """Defaults are transformers' Gemma2Config defaults for keys a config omits."""
    base = {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
            "num_attention_heads": 4, "vocab_size": 384}
    args = ModelArgs.from_dict(base)
    assert args.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (args.head_dim, args.query_pre_attn_scalar, args.sliding_window) == (256, 256, 4096)
    assert (args.attn_logit_softcapping, args.final_logit_softcapping, args.tie_word_embeddings) == (50.0, 30.0, True)
    assert ModelArgs.from_dict({**base, "sliding_window": None}).layer_types == ["full_attention"] * 3
    lifted = ModelArgs.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert lifted.rope_theta == 5e5 and lifted.rope_scaling is None
    with pytest.raises(ValueError):
        ModelArgs.from_dict({**base, "layer_types": ["full_attention"] * 2})
    kit = float_run[0]
    info = kit.arch_info
    assert info.post_norms and (info.d_mlp, info.sliding_window, info.head_dim) == (128, WINDOW, 16)
    assert [type(c).__name__ for c in kit.model.make_cache()] == ["RotatingKVCache", "KVCache"] * 2
    assert kit.model.layers[0].self_attn.scale == pytest.approx(24**-0.5)
    assert "layers.3.mlp_pre_norm" in kit.hook_points and "layers.0.router" not in kit.hook_points


def test_mlx_lm_8bit_conversion_matches_dequantized_transformers(float_run, ckpt: Path, root: Path) -> None:
    """A folder mlx-lm's own converter writes (its key names, 8 bits, group 32) loads natively."""
    from mlx_lm import convert

    path = root / "mlx_lm_q8"
    if not path.exists():
        convert(str(ckpt), mlx_path=str(path), quantize=True, q_bits=8, q_group_size=32)
    kit = mlx_engine.load_model(path)
    assert kit.native and kit.model.layers[0].mlp.down_proj.bits == 8
    ids = float_run[1]
    assert max_diff(our_logits(kit.model, ids), their_logits(dequantized_reference(kit, ckpt), ids)) <= TOL


def test_embedding_scale_is_rounded_to_the_embedding_dtype() -> None:
    """transformers multiplies by sqrt(hidden_size) cast to the weights' dtype: 55.43 -> 55.5 in bfloat16."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    model = Model(ModelArgs(hidden_size=3072, num_hidden_layers=1, intermediate_size=8, num_attention_heads=1,
                            num_key_value_heads=1, head_dim=8, vocab_size=4))
    model.set_dtype(mx.bfloat16)
    model.model.embed_tokens.weight = mx.ones((4, 3072), dtype=mx.bfloat16)
    seen: list[mx.array] = []
    model.model_hooks.embedding.fn = lambda hp, x, ctx: seen.append(x) or x
    model(mx.array([[1]]))
    model.model_hooks.embedding.fn = None
    theirs = Gemma2TextScaledWordEmbedding(4, 3072, 0, embed_scale=3072**0.5).to(torch.bfloat16)
    torch.nn.init.ones_(theirs.weight)
    with torch.no_grad():
        expected = theirs(torch.tensor([[1]])).float().numpy()
    assert seen[0].dtype == mx.bfloat16 and expected[0, 0, 0] == 55.5
    np.testing.assert_array_equal(np.array(seen[0].astype(mx.float32)), expected)
