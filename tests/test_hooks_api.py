"""The hook API: names and aliases, clear errors, the budget, run_with_cache, fallback models."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import mlx_engine
from mlx_engine import ActivationHookManager, ActivationHookSpec, CaptureBudgetError, ComponentType, HookSpecError
import tiny_checkpoints as tc

PROMPT = "def encode(self, obj):\n    return obj"


def test_component_vocabulary() -> None:
    core = {"residual", "attention", "mlp", "embedding", "layernorm", "attention_scores", "attention_pattern", "key", "query", "value"}
    assert core <= {c.value for c in ComponentType}
    assert {c.value for c in mlx_engine.hooks.CORE_COMPONENTS} == core
    assert ComponentType("router") is ComponentType.ROUTER


@pytest.mark.parametrize(
    "name",
    ["5", 5, "layers.5", "model.layers.5", "transformer.h.5", "blocks.5", "model.layers.5.self_attn", "model.layers.5.mlp"],
)
def test_layer_name_forms(gpt_oss_kit, name) -> None:
    info = gpt_oss_kit.arch_info
    if info.num_layers <= 5:
        name = name.replace("5", "3") if isinstance(name, str) else 3
    (r,) = gpt_oss_kit.resolve_hooks([{"layer_name": name, "component": "residual"}])
    assert r.layer_name == f"layers.{3 if info.num_layers <= 5 else 5}" and r.component is ComponentType.RESIDUAL


@pytest.mark.parametrize(
    "name, component",
    [
        ("layers.2.mlp", "mlp"),
        ("layers.2.residual", "residual"),
        ("model.layers.2.mlp", "mlp"),
        ("model.layers.2.self_attn", "attention"),
        ("model.layers.2.input_layernorm", "layernorm"),
        ("model.layers.2.self_attn.q_proj", "query"),
    ],
)
def test_plain_names_imply_their_component(gpt_oss_kit, name, component) -> None:
    """A canonical hook id or a module path alone names the module's own output."""
    (r,) = gpt_oss_kit.resolve_hooks([name])
    assert (r.hook_id, r.component.value, r.is_input) == (f"layers.2.{component}", component, False)


@pytest.mark.parametrize(
    "alias, component, is_input",
    [
        ("blocks.1.hook_resid_post", "residual", False),
        ("blocks.1.hook_resid_pre", "residual", True),
        ("blocks.1.attn.hook_q", "query", False),
        ("blocks.1.attn.hook_k", "key", False),
        ("blocks.1.attn.hook_v", "value", False),
        ("blocks.1.attn.hook_z", "z", False),
        ("blocks.1.attn.hook_pattern", "attention_pattern", False),
        ("blocks.1.attn.hook_attn_scores", "attention_scores", False),
        ("blocks.1.hook_attn_out", "attention", False),
        ("blocks.1.hook_mlp_out", "mlp", False),
        ("blocks.1.ln1.hook_normalized", "layernorm", False),
        ("hook_embed", "embedding", False),
    ],
)
def test_transformerlens_aliases(gpt_oss_kit, alias, component, is_input) -> None:
    (r,) = gpt_oss_kit.resolve_hooks([{"layer_name": alias}])
    assert r.component.value == component and r.is_input == is_input


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"layer_name": 99, "component": "residual"}, r"Layer 99 is out of range: this model has 4 layers \(0..3\)"),
        ({"layer_name": -1, "component": "residual"}, r"out of range"),
        ({"layer_name": "decoder.blocks.x", "component": "residual"}, r"Unknown layer name .*valid layer names: 0..3"),
        ({"layer_name": 1, "component": "resid"}, r"Unknown component 'resid'; valid components for this model: residual"),
        ({"layer_name": 1}, r"No component given .*valid: residual"),
        ({"layer_name": 1, "component": "query", "capture_input": True, "capture_output": False}, r"has no input"),
        ({"layer_name": 1, "component": "residual", "capture_output": False}, r"both false"),
        ({"layer_name": 1, "component": "residual", "colour": "red"}, r"Unknown hook spec field"),
        ({"component": "residual"}, r"needs 'layer_name'"),
        ({"layer_name": "embedding", "component": "mlp"}, r"only the 'embedding' component"),
        ({"layer_name": "blocks.1.attn.hook_q", "component": "key"}, r"names the query component"),
        ({"layer_name": 1, "component": "residual", "capture_input": "yes"}, r"must be true or false"),
        ("blocks.1.hook_nothing", r"Unknown hook name"),
        (42.5, r"is a dict like"),
    ],
)
def test_invalid_specs_say_what_is_valid(gpt_oss_kit, spec, message) -> None:
    with pytest.raises(HookSpecError, match=message):
        gpt_oss_kit.resolve_hooks([spec])


def test_router_only_for_moe(gpt_oss_kit, llama_kit) -> None:
    gpt_oss_kit.resolve_hooks([{"layer_name": 0, "component": "router"}])
    with pytest.raises(HookSpecError, match="'router' is not offered by this model"):
        llama_kit.resolve_hooks([{"layer_name": 0, "component": "router"}])


def test_duplicate_hook_ids_rejected(llama_kit) -> None:
    with pytest.raises(HookSpecError, match="requested twice"):
        llama_kit.resolve_hooks([{"layer_name": 0, "component": "mlp"}, {"layer_name": "layers.0", "component": "mlp"}])


def test_input_and_output_in_one_spec(llama_kit) -> None:
    ids = mlx_engine.tokenize(llama_kit, PROMPT)
    spec = ActivationHookSpec("layers.1", "residual", hook_id="r1", capture_input=True, capture_output=True)
    result = mlx_engine.run_with_cache(llama_kit, ids, [spec, {"layer_name": 0, "component": "residual"}])
    assert set(result.activations) == {"r1", "r1.input", "layers.0.residual"}
    np.testing.assert_array_equal(np.array(result["r1.input"]), np.array(result["layers.0.residual"]))
    assert result.activations["r1.input"].is_input and not result.activations["r1"].is_input


def test_manager_registry(llama_kit) -> None:
    manager = ActivationHookManager(llama_kit)
    assert manager.register_hook({"layer_name": 2, "component": "mlp", "hook_id": "m2"}) == ["m2"]
    manager.register_hook(ActivationHookSpec(0, "query"))
    assert [h["hook_id"] for h in manager.list_hooks()] == ["m2", "layers.0.query"]
    with pytest.raises(HookSpecError, match="already registered"):
        manager.register_hook({"layer_name": 2, "component": "mlp", "hook_id": "m2"})
    manager.unregister_hook("m2")
    with pytest.raises(KeyError, match="No hook 'm2'"):
        manager.unregister_hook("m2")
    manager.clear_all_hooks()
    assert manager.list_hooks() == []


def test_hook_points_describe_shapes(gpt_oss_kit) -> None:
    points = ActivationHookManager(gpt_oss_kit).hook_points()
    info = gpt_oss_kit.arch_info
    assert points["num_layers"] == info.num_layers == len(points["layers"])
    layer = points["layers"][0]
    assert layer["attention_type"] == "sliding_attention" and layer["window"] == info.sliding_window
    assert layer["components"]["query"]["shape"] == [info.n_heads, "T", info.head_dim]
    assert layer["components"]["key"]["shape"] == [info.n_kv_heads, "T", info.head_dim]
    assert layer["components"]["router"]["shape"] == ["T", info.n_experts]
    ids = mlx_engine.tokenize(gpt_oss_kit, PROMPT)
    result = mlx_engine.run_with_cache(gpt_oss_kit, ids, [{"layer_name": 0, "component": c} for c in layer["components"]])
    T = len(ids)
    for component, desc in layer["components"].items():
        actual = result.activations[f"layers.0.{component}"].shape
        assert len(actual) == len(desc["shape"]), component
        for promised, got in zip(desc["shape"], actual):
            assert got == {"T": T, "S": T}.get(promised, promised), (component, desc["shape"], actual)


def test_run_with_cache_equals_generation_step_zero(gpt_oss_kit) -> None:
    ids = mlx_engine.tokenize(gpt_oss_kit, PROMPT)
    hooks = [{"layer_name": i, "component": "residual"} for i in range(gpt_oss_kit.arch_info.num_layers)]
    cached = mlx_engine.run_with_cache(gpt_oss_kit, PROMPT, hooks)
    _, step0 = next(iter(mlx_engine.create_generator_with_activations(gpt_oss_kit, ids, hooks, max_tokens=1)))
    for hook_id, (capture,) in step0.items():
        np.testing.assert_array_equal(np.array(capture.array), np.array(cached[hook_id]))
        assert capture.positions == (0, len(ids))


def test_alignment_prompt_captures_come_with_first_token(llama_kit) -> None:
    ids = mlx_engine.tokenize(llama_kit, PROMPT)
    steps = list(mlx_engine.create_generator_with_activations(llama_kit, ids, [{"layer_name": 2, "component": "residual"}], max_tokens=5))
    positions = [acts["layers.2.residual"][0].positions for _, acts in steps]
    assert positions == [(0, len(ids))] + [(len(ids) + k, len(ids) + k + 1) for k in range(4)]
    # The last generated token never passes through the model.
    assert len(steps) == 5


def test_chunked_prefill_keeps_every_prompt_capture(llama_kit) -> None:
    ids = mlx_engine.tokenize(llama_kit, PROMPT * 2)
    hooks = [{"layer_name": 1, "component": "attention_pattern"}, {"layer_name": 1, "component": "residual"}]
    (_, step0), *_ = mlx_engine.create_generator_with_activations(llama_kit, ids, hooks, max_tokens=2, prefill_step_size=7)
    chunks = step0["layers.1.residual"]
    assert [c.positions for c in chunks] == [(s, min(s + 7, len(ids))) for s in range(0, len(ids), 7)]
    whole = mlx_engine.run_with_cache(llama_kit, ids, hooks)
    np.testing.assert_allclose(np.concatenate([np.array(c.array) for c in chunks]), np.array(whole["layers.1.residual"]), atol=1e-5)
    for c in step0["layers.1.attention_pattern"]:
        assert c.key_positions == list(range(0, c.positions[1]))


def test_budget_refuses_before_generating(gpt_oss_kit) -> None:
    ids = mlx_engine.tokenize(gpt_oss_kit, PROMPT)
    hooks = [{"layer_name": i, "component": "attention_pattern"} for i in range(gpt_oss_kit.arch_info.num_layers)]
    estimate = mlx_engine.estimate_capture_bytes(gpt_oss_kit, hooks, len(ids), 50)
    with pytest.raises(CaptureBudgetError, match=r"about .* MiB of activations .*over the capture budget") as err:
        mlx_engine.create_generator_with_activations(gpt_oss_kit, ids, hooks, max_tokens=50, capture_budget_bytes=estimate - 1)
    assert err.value.estimate_bytes == estimate
    # The refusal happened at the call, before any forward: no hook point was left armed.
    assert all(not p.armed for p in gpt_oss_kit.hook_points.values())
    # Within budget, the estimate is an upper bound on what is captured.
    captured = 0
    for _, acts in mlx_engine.create_generator_with_activations(gpt_oss_kit, ids, hooks, max_tokens=50, capture_budget_bytes=estimate):
        captured += sum(c.array.nbytes for cs in acts.values() for c in cs)
    assert 0 < captured <= estimate


def test_closed_generator_disarms(llama_kit) -> None:
    ids = mlx_engine.tokenize(llama_kit, PROMPT)
    gen = mlx_engine.create_generator_with_activations(llama_kit, ids, [{"layer_name": 0, "component": "mlp"}], max_tokens=20)
    next(gen)
    assert llama_kit.hook_points["layers.0.mlp"].armed
    gen.close()
    assert not llama_kit.hook_points["layers.0.mlp"].armed


@pytest.fixture(scope="module")
def fallback(tmp_path_factory: pytest.TempPathFactory):
    """Starcoder2: an architecture with no native file, which mlx-lm loads."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    out = tmp_path_factory.mktemp("starcoder2")
    tok = tc.build_tokenizer(out)
    config = Starcoder2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, hidden_act="gelu",
    )
    model = Starcoder2ForCausalLM(config)
    tc.spread_weights(model)
    model.eval()
    model.save_pretrained(out)
    return mlx_engine.load_model(out), model


def test_fallback_architecture_module_components(fallback) -> None:
    """A model we have no native file for still yields embedding, residual, attention, mlp, layernorm."""
    kit, reference = fallback
    assert not kit.native
    points = ActivationHookManager(kit).hook_points()
    assert points["components"] == ["embedding", "residual", "attention", "mlp", "layernorm"]
    ids = mlx_engine.tokenize(kit, PROMPT)
    hooks = [{"layer_name": "embedding", "component": "embedding"}]
    for i in range(2):
        hooks += [{"layer_name": i, "component": c} for c in ("residual", "attention", "mlp", "layernorm")]
    outputs: dict[str, np.ndarray] = {}
    handles = []
    for i, block in enumerate(reference.model.layers):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(f"{i}.residual", (o[0] if isinstance(o, tuple) else o)[0].numpy())))
        handles.append(block.self_attn.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(f"{i}.attention", o[0][0].numpy())))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(f"{i}.mlp", o[0].numpy())))
        handles.append(block.input_layernorm.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(f"{i}.layernorm", o[0].numpy())))
    with torch.no_grad():
        out = reference(torch.tensor([ids]), output_hidden_states=True)
    for h in handles:
        h.remove()
    cached = mlx_engine.run_with_cache(kit, ids, hooks)
    np.testing.assert_allclose(np.array(cached.logits), out.logits[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.array(cached["embedding"]), out.hidden_states[0][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(cached["layers.0.residual"]), out.hidden_states[1][0].numpy(), atol=1e-4)
    for key, expected in outputs.items():
        np.testing.assert_allclose(np.array(cached[f"layers.{key}"]), expected, atol=1e-4, err_msg=key)
    with pytest.raises(HookSpecError, match="'attention_pattern' is not offered"):
        kit.resolve_hooks([{"layer_name": 0, "component": "attention_pattern"}])
    plain = [r.token for r in mlx_engine.create_generator(kit, ids, max_tokens=8)]
    captured = [r.token for r, _ in mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=8)]
    assert plain == captured
