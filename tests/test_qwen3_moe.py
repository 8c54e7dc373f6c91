"""Native Qwen 3 MoE against transformers (float32, eager attention) on the same weights.

Tiny checkpoints written by transformers itself: hidden 64, 4 query heads over 2 KV heads,
head_dim 32 (not 64 / 4), 4 experts of width 32 with 2 routed per token, dense MLPs of width 96.
"mixed": 3 layers, layer 1 dense (`mlp_only_layers`), `norm_topk_prob`, a window of 8 on every
layer (rotating caches that wrap during decode). "step2": 4 layers, `decoder_sparse_step` 2
(layers 1 and 3 sparse), unnormalised top-k weights, no window. Weights N(0, 0.15).

The reference's tensors are read through torch forward hooks and a recording attention
function; the routed experts' units are computed from transformers' own expert parameters and
activation for the experts our capture names. A 40-token prompt (80 routed rows) takes
SwitchGLU's expert-sorted path, decode steps the unsorted one.

Tolerances (float32 on both sides): atol = rtol = 1e-4 for every component and the logits, the
4-bit conversions included (their reference carries the dequantized weights); the chosen experts
exactly equal; greedy tokens exactly equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.qwen3_moe.modeling_qwen3_moe import eager_attention_forward

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine.models.qwen3_moe import EXPERT_SITES, Model, ModelArgs
from mlx_engine.tools.convert import quantize_checkpoint
from test_hooks_equivalence import compare
from test_qwen3 import dequantized_state, greedy, load_state, text_ids, their_logits

ATOL = RTOL = 1e-4
WINDOW = 8
PROMPT_LEN, DECODE_STEPS = 40, 4
PREFILL, GREEDY = 12, 32  # GREEDY >= WINDOW + 20: 20+ steps after the rotating caches wrap
VARIANTS = {
    "mixed": dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True, use_sliding_window=True, sliding_window=WINDOW),
    "step2": dict(num_hidden_layers=4, decoder_sparse_step=2, norm_topk_prob=False),
}
SPARSE = {"mixed": [0, 2], "step2": [1, 3]}


def build_qwen3_moe(out_dir: Path, variant: str, seed: int = 0) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = tc.build_tokenizer(out_dir)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **VARIANTS[variant],
    )
    config._attn_implementation = "eager"
    model = Qwen3MoeForCausalLM(config)
    tc.spread_weights(model, seed=seed)
    model.eval()
    return tc._save(model, tokenizer, out_dir)


def reference_state(kit: Any) -> dict[str, np.ndarray]:
    """Our (dequantized) parameters under transformers' in-memory names: stacked experts fused back."""
    ours = dequantized_state(kit.model)
    state = {k: v for k, v in ours.items() if ".switch_mlp." not in k}
    for k in ours:
        if k.endswith(".switch_mlp.gate_proj.weight"):
            mlp = k[: -len(".switch_mlp.gate_proj.weight")]
            # [E, 2I, H], gate rows first; down_proj [E, H, I] as SwitchGLU stores it.
            state[f"{mlp}.experts.gate_up_proj"] = np.concatenate([ours[k], ours[f"{mlp}.switch_mlp.up_proj.weight"]], axis=1)
            state[f"{mlp}.experts.down_proj"] = ours[f"{mlp}.switch_mlp.down_proj.weight"]
    return state


class MoeReference:
    """One transformers forward, recording what each capture site sees under test_hooks_equivalence's
    key names, for dense and sparse blocks; sparse blocks add the router's logits, weights and indices."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.t: dict[str, np.ndarray] = {}

    def run(self, ids: list[int]) -> None:
        store, handles = self.t, []

        def save(key: str, pick: Any = lambda a, o: o[0] if isinstance(o, tuple) else o) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                store[key] = pick(args, output).detach()[0].float().numpy()

            return hook

        def save_router(i: int) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:  # [T, E], [T, k], [T, k]: no batch axis
                for name, tensor in zip(("router", "router_weights", "router_indices"), output):
                    store[f"{i}.{name}"] = tensor.detach().numpy()

            return hook

        for i, block in enumerate(self.model.model.layers):
            mlp, attn = block.mlp, block.self_attn
            handles += [
                block.register_forward_hook(save(f"{i}.residual")),
                block.register_forward_hook(save(f"{i}.resid_pre", lambda a, o: a[0])),
                block.input_layernorm.register_forward_hook(save(f"{i}.layernorm")),
                attn.register_forward_hook(save(f"{i}.attention")),
                block.post_attention_layernorm.register_forward_hook(save(f"{i}.mlp_in")),
                block.post_attention_layernorm.register_forward_hook(save(f"{i}.resid_mid", lambda a, o: a[0])),
                mlp.register_forward_hook(save(f"{i}.mlp")),
            ]
            if hasattr(mlp, "experts"):
                handles.append(mlp.gate.register_forward_hook(save_router(i)))
            else:
                handles.append(mlp.gate_proj.register_forward_hook(save(f"{i}.mlp_pre")))
                handles.append(mlp.down_proj.register_forward_hook(save(f"{i}.mlp_post", lambda a, o: a[0])))
            attn._capture_layer = i

        def recording_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any):
            i = module._capture_layer
            store[f"{i}.query"], store[f"{i}.key"], store[f"{i}.value"] = (t[0].detach().numpy() for t in (query, key, value))
            k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            scores = torch.matmul(query, k.transpose(2, 3)) * kwargs["scaling"]
            store[f"{i}.attention_scores"] = scores[0].detach().numpy()
            store[f"{i}.allowed"] = (mask[:, :, :, : k.shape[-2]] == 0)[0].expand_as(scores[0]).numpy()
            out, weights = eager_attention_forward(module, query, key, value, mask, **kwargs)
            store[f"{i}.attention_pattern"] = weights[0].detach().numpy()
            store[f"{i}.z"] = out[0].transpose(0, 1).detach().numpy()  # [H, T, D]
            return out, weights

        AttentionInterface.register("recording_qwen3_moe", recording_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register("recording_qwen3_moe", eager_mask)
        self.model.config._attn_implementation = "recording_qwen3_moe"
        try:
            with torch.no_grad():
                out = self.model(torch.tensor([ids]), output_hidden_states=True)
        finally:
            self.model.config._attn_implementation = "eager"
            for h in handles:
                h.remove()
        store["embedding"] = out.hidden_states[0][0].numpy()
        store["final_norm"] = out.hidden_states[-1][0].numpy()
        store["logits"] = out.logits[0].numpy()


def expected_experts(reference: Any, layer: int, h: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' gate pre-activation and act(gate) * up [T, k, I] for the experts `chosen` [T, k]
    of each row of the experts' input h [T, d_model], from its fused gate_up_proj [E, 2I, H]."""
    experts = reference.model.layers[layer].mlp.experts
    with torch.no_grad():
        w = experts.gate_up_proj[torch.from_numpy(chosen.astype(np.int64))]  # [T, k, 2I, H]
        gate_up = torch.einsum("th,tkih->tki", torch.from_numpy(h), w)
        gate, up = gate_up.chunk(2, dim=-1)
        return gate.numpy(), (experts.act_fn(gate) * up).numpy()


def compare_moe(capture: Any, ref: MoeReference, n_layers: int) -> None:
    comp, i, (start, end) = capture.component, capture.layer, capture.positions
    what = f"{capture.hook_id} step {capture.step} rows {start}:{end}"
    if comp == "router":
        np.testing.assert_allclose(np.array(capture.array), ref.t[f"{i}.router"][start:end], atol=ATOL, rtol=RTOL, err_msg=what)
        ours_idx, ours_w = np.array(capture.extras["experts"]), np.array(capture.extras["weights"])
        theirs_idx, theirs_w = ref.t[f"{i}.router_indices"][start:end], ref.t[f"{i}.router_weights"][start:end]
        mine, theirs = np.argsort(ours_idx, axis=-1), np.argsort(theirs_idx, axis=-1)
        assert np.array_equal(np.take_along_axis(ours_idx, mine, -1), np.take_along_axis(theirs_idx, theirs, -1)), what
        np.testing.assert_allclose(
            np.take_along_axis(ours_w, mine, -1), np.take_along_axis(theirs_w, theirs, -1), atol=ATOL, rtol=RTOL, err_msg=what
        )
    elif comp in ("expert_pre", "expert_post"):
        chosen = np.array(capture.extras["experts"])
        pre, post = expected_experts(ref.model, i, ref.t[f"{i}.mlp_in"][start:end], chosen)
        expected = pre if comp == "expert_pre" else post
        np.testing.assert_allclose(np.array(capture.array), expected, atol=ATOL, rtol=RTOL, err_msg=what)
    else:
        compare(capture, ref.t, n_layers)


def moe_hooks(kit: Any) -> list[dict[str, Any]]:
    """Every offered site at every layer, outputs and inputs, less the expert sites of dense blocks."""
    listing = mlx_engine.ActivationHookManager(kit).hook_points()
    sparse = set(kit.model.sparse_layers)
    hooks: list[dict[str, Any]] = [{"layer_name": "embedding", "component": "embedding"}, {"layer_name": "final_norm", "component": "layernorm"}]
    for layer in listing["layers"]:
        for component, desc in layer["components"].items():
            if component in EXPERT_SITES and layer["layer"] not in sparse:
                continue
            hooks.append({"layer_name": layer["name"], "component": component})
            if desc["supports_input"]:
                hooks.append({"layer_name": layer["name"], "component": component, "capture_input": True, "capture_output": False})
    return hooks


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qwen3_moe")


@pytest.fixture(scope="module")
def paths(root: Path) -> dict[str, Path]:
    return {name: build_qwen3_moe(root / name, name) for name in VARIANTS}


@pytest.fixture(scope="module", params=["mixed", "mixed-q4g32", "step2"])
def case(request: pytest.FixtureRequest, root: Path, paths: dict[str, Path]) -> tuple[str, Any, Any]:
    """(name, our kit, transformers carrying exactly the weights our kit computes with)."""
    variant = request.param.split("-")[0]
    reference = tc.load_reference(paths[variant], "Qwen3MoeForCausalLM")
    if not request.param.endswith("q4g32"):
        return request.param, mlx_engine.load_model(paths[variant]), reference
    kit = mlx_engine.load_model(quantize_checkpoint(paths[variant], root / "q4", bits=4, group_size=32))
    assert kit.config["quantization"]["bits"] == 4
    assert kit.config["quantization"]["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    return request.param, kit, load_state(reference, reference_state(kit))


def test_config_selects_architecture(case: tuple[str, Any, Any]) -> None:
    name, kit, _ = case
    variant = name.split("-")[0]
    model, info = kit.model, kit.arch_info
    assert model.sparse_layers == SPARSE[variant]
    assert (info.n_experts, info.experts_per_token, info.d_mlp, info.head_dim) == (4, 2, 32, 32)
    assert list(info.layer_types) == (["sliding_attention"] * 3 if variant == "mixed" else ["full_attention"] * 4)
    for i, layer in enumerate(model.layers):
        points = layer.hooks.points()
        sparse = i in SPARSE[variant]
        assert (f"layers.{i}.expert_pre" in points, f"layers.{i}.mlp_pre" in points) == (sparse, not sparse)
    listing = mlx_engine.ActivationHookManager(kit).hook_points()
    assert {"router", "expert_pre", "expert_post"} <= set(listing["components"]) and "mlp_pre" not in listing["components"]


def test_every_component_every_layer_matches_transformers(case: tuple[str, Any, Any]) -> None:
    """A 40-token prompt and decode steps: every capture site, the routing and the routed experts' units."""
    name, kit, reference = case
    ids = text_ids(kit, PROMPT_LEN)
    steps = list(mlx_engine.create_generator_with_activations(kit, ids, moe_hooks(kit), max_tokens=DECODE_STEPS))
    generated = [r.token for r, _ in steps]
    ref = MoeReference(reference)
    ref.run(ids + generated[:-1])
    counts: dict[str, int] = {}
    for _, activations in steps:
        for captures in activations.values():
            for capture in captures:
                compare_moe(capture, ref, kit.arch_info.num_layers)
                counts[capture.component] = counts.get(capture.component, 0) + 1
    assert counts["router"] == counts["expert_pre"] == counts["expert_post"] == 2 * DECODE_STEPS
    assert generated == ref.t["logits"][len(ids) - 1 :].argmax(-1).tolist()


def test_dense_blocks_neurons_match_transformers(case: tuple[str, Any, Any]) -> None:
    """The dense blocks' mlp_pre / mlp_post, read from their hook points (the listing cannot offer them)."""
    name, kit, reference = case
    ids = text_ids(kit, PROMPT_LEN)
    dense = [i for i in range(kit.arch_info.num_layers) if i not in kit.model.sparse_layers]
    points = [kit.hook_points[f"layers.{i}.{site}"] for i in dense for site in ("mlp_pre", "mlp_post")]
    seen: dict[str, np.ndarray] = {}

    def record(hp: Any, x: mx.array, ctx: dict) -> mx.array:
        seen[hp.name] = np.array(x[0])
        return x

    for hp in points:
        hp.fn = record
    try:
        kit.model(mx.array(ids)[None])
    finally:
        for hp in points:
            hp.fn = None
    ref = MoeReference(reference)
    ref.run(ids)
    for i in dense:
        for site in ("mlp_pre", "mlp_post"):
            np.testing.assert_allclose(seen[f"layers.{i}.{site}"], ref.t[f"{i}.{site}"], atol=ATOL, rtol=RTOL)


def test_dense_block_expert_request_is_a_hook_spec_error(paths: dict[str, Path]) -> None:
    kit = mlx_engine.load_model(paths["mixed"])
    ids = text_ids(kit, 8)
    with pytest.raises(mlx_engine.HookSpecError, match="layer 1 .* dense MLP"):
        mlx_engine.run_with_cache(kit, ids, [{"layer_name": 1, "component": "expert_pre"}])
    with pytest.raises(mlx_engine.HookSpecError, match="layers.1.router does not exist"):
        next(mlx_engine.create_generator_with_activations(kit, ids, [{"layer_name": 1, "component": "router"}], max_tokens=2))
    with pytest.raises(mlx_engine.HookSpecError, match="dense MLP"):
        mlx_engine.run_with_cache(kit, ids, interventions=[{"layer_name": 1, "component": "expert_post", "op": "zero"}])
    # The sparse layers' sites still work, and no site was left armed by the failures.
    cache = mlx_engine.run_with_cache(kit, ids, [{"layer_name": 2, "component": "expert_post"}])
    assert np.array(cache["layers.2.expert_post"]).shape == (8, 2, 32)
    assert all(hp.fn is None for hp in kit.hook_points.values())


def test_logits_past_the_window_wrap_and_greedy_tokens(case: tuple[str, Any, Any]) -> None:
    """32 greedy steps after a 12-token prompt: each step's logits equal transformers' forward over the
    whole sequence (the window-8 caches wrap after 8 positions), tokens equal transformers' greedy generate."""
    name, kit, reference = case
    prompt = text_ids(kit, PREFILL)
    tokens, ours = greedy(kit.model, prompt, GREEDY)
    theirs = their_logits(reference, prompt + tokens[:-1])[PREFILL - 1 :]
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY, min_new_tokens=GREEDY, eos_token_id=None, pad_token_id=0
        )
    assert out[0, PREFILL:].tolist() == tokens


def transformers4_copy(src: Path, dst: Path) -> Path:
    """The config as transformers 4 wrote it: num_experts (not num_local_experts), rope_theta at the top."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, num_experts=config.pop("num_local_experts"))
    config.update(torch_dtype=config.pop("dtype"), transformers_version="4.51.3")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def test_checkpoint_layouts_load_to_the_same_logits(root: Path, paths: dict[str, Path]) -> None:
    """transformers 4's config, transformers 5's fused in-memory expert tensors, and mlx-lm's own
    4-bit conversion (stacked `switch_mlp` tensors, router at 8 bits) all equal transformers."""
    from mlx_lm import convert
    from mlx_lm.utils import load_model as mlx_lm_load_model

    ids = list(range(3, 40))
    reference = tc.load_reference(paths["step2"], "Qwen3MoeForCausalLM")
    expected = their_logits(reference, ids)
    v4 = transformers4_copy(paths["step2"], root / "v4")
    fused = shutil.copytree(paths["step2"], root / "fused")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(fused / "model.safetensors"))
    for path in (v4, fused):
        kit = mlx_engine.load_model(path)
        assert kit.model.sparse_layers == SPARSE["step2"]
        np.testing.assert_allclose(np.array(kit.model(mx.array(ids)[None])[0]), expected, atol=ATOL, rtol=RTOL, err_msg=str(path))

    convert(str(v4), str(root / "mlx_lm_q4"), quantize=True, q_group_size=32, q_bits=4)
    kit = mlx_engine.load_model(root / "mlx_lm_q4")
    ours = np.array(kit.model(mx.array(ids)[None])[0])
    dequantized = load_state(tc.load_reference(paths["step2"], "Qwen3MoeForCausalLM"), reference_state(kit))
    np.testing.assert_allclose(ours, their_logits(dequantized, ids), atol=ATOL, rtol=RTOL)
    theirs, _ = mlx_lm_load_model(root / "mlx_lm_q4")  # mlx-lm's own model on its own conversion
    np.testing.assert_allclose(ours, np.array(theirs(mx.array(ids)[None])[0]), atol=ATOL, rtol=RTOL)
    assert np.abs(ours - expected).max() > 1e-2, "the 4-bit model must differ from the float one"


def test_config_rules() -> None:
    """transformers' Qwen3MoeConfig defaults, its sparse-layer rule and its every-layer window."""
    base = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    plain = ModelArgs.from_dict(base)
    assert plain.head_dim == 16 and plain.num_experts == 128 and not plain.norm_topk_prob and not plain.tie_word_embeddings
    assert plain.sliding_window is None and plain.layer_types == ["full_attention"] * 4 and plain.mlp_only_layers == []
    both = ModelArgs.from_dict({**base, "num_experts": 6, "num_local_experts": 8})
    assert both.num_experts == 8
    windowed = ModelArgs.from_dict(
        {**base, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2, "layer_types": ["full_attention"] * 4}
    )
    assert windowed.layer_types == ["sliding_attention"] * 4
    mixed = ModelArgs.from_dict({**base, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert [mixed.is_sparse(i) for i in range(4)] == [False, True, False, False]
    # Every block dense: the model reports itself as dense (its neurons are the dense MLP's).
    small = dict(vocab_size=32, intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    dense = Model(ModelArgs.from_dict({**base, **small, "mlp_only_layers": [0, 1, 2, 3]}))
    assert dense.sparse_layers == [] and dense.arch_info.n_experts is None and dense.arch_info.d_mlp == 96
