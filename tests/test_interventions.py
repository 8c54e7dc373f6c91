"""Interventions edit the forward pass exactly as the same edit made inside transformers does.

The reference is transformers (float32, eager attention) on the same weights, edited by
torch hooks on its modules: a forward hook replacing the decoder layer's output
(residual), self_attn's output (attention), the mlp's output (mlp; gpt-oss's returns a
tuple), v_proj's output (value heads), a forward pre-hook replacing the decoder layer's
input (residual input) or o_proj's input (z: the per-head attention output before the
output projection). Logits must agree within 1e-4 (float32 on both sides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine import HookSpecError, InterventionError
from mlx_engine.interventions import OPS, parse_intervention, prepare_interventions

ATOL = 1e-4
RTOL = 1e-4
PROMPT = "def encode(self, obj):\n    return json.dumps(obj)"
OTHER = "class Decoder(object):\n    pass"
ARCH_CLASS = {"llama": "LlamaForCausalLM", "gpt_oss": "GptOssForCausalLM"}


@pytest.fixture(scope="module", params=sorted(ARCH_CLASS))
def arch(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    name = request.param
    path: Path = request.getfixturevalue(f"{name}_checkpoint")
    kit = request.getfixturevalue(f"{name}_kit")
    return name, kit, tc.load_reference(path, ARCH_CLASS[name])


class EditedReference:
    """A transformers forward with edits installed as torch hooks, removed after the run."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.handles: list[Any] = []

    def block(self, layer: int) -> Any:
        return self.model.model.layers[layer]

    def on_output(self, module: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        def hook(_: Any, __: Any, out: Any) -> Any:
            return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)

        self.handles.append(module.register_forward_hook(hook))

    def on_input(self, module: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        def hook(_: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def record_output(self, module: Any, store: dict[str, np.ndarray], key: str) -> None:
        def hook(_: Any, __: Any, out: Any) -> None:
            store[key] = (out[0] if isinstance(out, tuple) else out)[0].detach().numpy().copy()

        self.handles.append(module.register_forward_hook(hook))

    def record_input(self, module: Any, store: dict[str, np.ndarray], key: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda _, args: store.__setitem__(key, args[0][0].detach().numpy().copy())))

    def logits(self, ids: list[int]) -> np.ndarray:
        try:
            with torch.no_grad():
                return self.model(torch.tensor([ids])).logits[0].numpy()
        finally:
            for h in self.handles:
                h.remove()
            self.handles = []


def masked(new: Callable[[torch.Tensor], torch.Tensor], mask: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """Replace the entries of a [1, T, W] tensor where mask [T, W] is set by new(t)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.from_numpy(mask)[None], new(t), t)

    return fn


def row_mask(T: int, W: int, rows: Optional[list[int]] = None, cols: Optional[list[int]] = None) -> np.ndarray:
    mask = np.zeros((T, W), dtype=bool)
    r = list(range(T)) if rows is None else rows
    c = list(range(W)) if cols is None else cols
    mask[np.ix_(r, c)] = True
    return mask


def head_cols(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _case(name: str, kit: Any, ref: EditedReference, T: int, rng: np.random.Generator) -> dict[str, Any]:
    """Our intervention for case `name`, with the same edit installed on the reference."""
    info = kit.arch_info
    d, D = info.d_model, info.head_dim
    last = info.num_layers - 1
    if name == "add_residual":
        v = rng.normal(size=d).astype(np.float32)
        ref.on_output(ref.block(1), lambda t: t + torch.from_numpy(v * np.float32(3.0)))
        return {"layer_name": "model.layers.1", "component": "residual", "op": "add", "vector": v.tolist(), "scale": 3.0}
    if name == "zero_mlp_neurons":
        idx, rows = [0, 5, 17, 40], [2, 3, 5]
        ref.on_output(ref.block(0).mlp, masked(torch.zeros_like, row_mask(T, d, rows, idx)))
        return {"layer_name": 0, "component": "mlp", "op": "zero", "indices": idx, "positions": rows}
    if name == "mean_attention":
        mean, idx = rng.normal(size=d).astype(np.float32), list(range(1, 11))
        ref.on_output(ref.block(last).self_attn, masked(lambda t: torch.from_numpy(mean).expand_as(t), row_mask(T, d, [1, 4], idx)))
        return {"layer_name": last, "component": "attention", "op": "mean", "values": mean, "indices": idx, "positions": [1, 4]}
    if name == "clamp_residual":
        ref.on_output(ref.block(0), lambda t: t.clamp(-0.5, 0.5))
        return {"layer_name": "blocks.0.hook_resid_post", "op": "clamp", "min": -0.5, "max": 0.5}
    if name == "scale_attention":
        ref.on_output(ref.block(1).self_attn, lambda t: t * 0.25)
        return {"layer_name": 1, "component": "attention", "op": "scale", "scale": 0.25}
    if name == "zero_z_head":
        ref.on_input(ref.block(1).self_attn.o_proj, masked(torch.zeros_like, row_mask(T, info.n_heads * D, None, head_cols([1], D))))
        return {"layer_name": 1, "component": "z", "op": "zero", "heads": [1]}
    if name == "zero_value_head":
        ref.on_output(ref.block(0).self_attn.v_proj, masked(torch.zeros_like, row_mask(T, info.n_kv_heads * D, None, head_cols([1], D))))
        return {"layer_name": 0, "component": "value", "op": "zero", "heads": [1]}
    if name == "add_residual_input":
        v = rng.normal(size=d).astype(np.float32)
        ref.on_input(ref.block(last), masked(lambda t: t + torch.from_numpy(v), row_mask(T, d, list(range(4, T)))))
        return {"layer_name": last, "component": "residual", "capture_input": True, "op": "add", "vector": v, "positions": list(range(4, T))}
    if name == "scale_mlp_prompt":
        ref.on_output(ref.block(1).mlp, lambda t: t * -1.0)
        return {"layer_name": 1, "component": "mlp", "op": "scale", "scale": -1.0, "positions": "prompt"}
    raise KeyError(name)


OP_CASES = [
    "add_residual", "zero_mlp_neurons", "mean_attention", "clamp_residual", "scale_attention",
    "zero_z_head", "zero_value_head", "add_residual_input", "scale_mlp_prompt",
]


@pytest.mark.parametrize("case", OP_CASES)
def test_each_operation_matches_transformers(arch, case: str) -> None:
    name, kit, model = arch
    ids = mlx_engine.tokenize(kit, PROMPT)
    ref = EditedReference(model)
    intervention = _case(case, kit, ref, len(ids), np.random.default_rng(0))
    expected = ref.logits(ids)
    ours = np.array(mlx_engine.run_with_cache(kit, ids, interventions=[intervention]).logits)
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=f"{name} {case}")
    plain = EditedReference(model).logits(ids)
    assert np.abs(expected - plain).max() > 1e-2, "the edit must change the logits for this comparison to mean anything"
    assert not any(p.armed for p in kit.hook_points.values())


def test_patch_from_another_prompt_matches_transformers(arch) -> None:
    name, kit, model = arch
    info = kit.arch_info
    ids, other = mlx_engine.tokenize(kit, PROMPT), mlx_engine.tokenize(kit, OTHER)
    assert len(other) < len(ids), "the source is shorter: only the positions it covers are patched"
    source = mlx_engine.run_with_cache(kit, other, [{"layer_name": 1, "component": "residual"}, {"layer_name": 2, "component": "z"}])

    stored: dict[str, np.ndarray] = {}
    recorder = EditedReference(model)
    recorder.record_output(recorder.block(1), stored, "residual")
    recorder.record_input(recorder.block(2).self_attn.o_proj, stored, "z")
    recorder.logits(other)

    T, S, D = len(ids), len(other), info.head_dim
    ref = EditedReference(model)
    resid_src = np.zeros((T, info.d_model), np.float32)
    resid_src[:S] = stored["residual"]
    ref.on_output(ref.block(1), masked(lambda t: torch.from_numpy(resid_src)[None], row_mask(T, info.d_model, [2, 5])))
    z_src = np.zeros((T, info.n_heads * D), np.float32)
    z_src[:S] = stored["z"]
    ref.on_input(ref.block(2).self_attn.o_proj, masked(lambda t: torch.from_numpy(z_src)[None], row_mask(T, info.n_heads * D, list(range(S)), head_cols([0, 2], D))))
    expected = ref.logits(ids)

    interventions = [
        {"layer_name": 1, "component": "residual", "op": "patch", "source": source, "positions": [2, 5]},
        {"layer_name": 2, "component": "z", "op": "patch", "source": source, "heads": [0, 2]},
    ]
    ours = np.array(mlx_engine.run_with_cache(kit, ids, interventions=interventions).logits)
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=name)
    assert np.abs(expected - EditedReference(model).logits(ids)).max() > 1e-2


def test_patching_a_prompts_own_capture_changes_nothing(arch) -> None:
    name, kit, _ = arch
    ids = mlx_engine.tokenize(kit, PROMPT)
    hooks = [{"layer_name": 1, "component": c} for c in ("residual", "z", "key")]
    own = mlx_engine.run_with_cache(kit, ids, hooks)
    interventions = [{"layer_name": 1, "component": c, "op": "patch", "source": own} for c in ("residual", "z", "key")]
    patched = mlx_engine.run_with_cache(kit, ids, hooks, interventions=interventions)
    np.testing.assert_array_equal(np.array(patched.logits), np.array(own.logits))

    # A generation's own captures (a list of per-step Captures) patched into the same generation.
    hook = [{"layer_name": 2, "component": "residual"}]
    steps = list(mlx_engine.create_generator_with_activations(kit, ids, hook, max_tokens=8))
    captures = [c for _, acts in steps for c in acts["layers.2.residual"]]
    again = list(
        mlx_engine.create_generator_with_activations(
            kit, ids, hook, max_tokens=8, interventions=[{"layer_name": 2, "component": "residual", "op": "patch", "source": captures}]
        )
    )
    assert [r.token for r, _ in again] == [r.token for r, _ in steps]
    for (_, a), (_, b) in zip(steps, again):
        np.testing.assert_array_equal(np.array(a["layers.2.residual"][0].array), np.array(b["layers.2.residual"][0].array))


def test_zero_effect_interventions_leave_tokens_unchanged(arch) -> None:
    name, kit, _ = arch
    ids = mlx_engine.tokenize(kit, PROMPT)
    info = kit.arch_info
    noop = [{"layer_name": i, "component": "residual", "op": "scale", "scale": 1.0} for i in range(info.num_layers)]
    noop += [
        {"layer_name": 1, "component": "mlp", "op": "add", "vector": [0.0] * info.d_model},
        {"layer_name": 1, "component": "query", "op": "add", "vector": np.zeros(info.head_dim), "heads": [0, 3]},
    ]
    plain = [r.token for r in mlx_engine.create_generator(kit, ids, max_tokens=16)]
    edited = [r.token for r in mlx_engine.create_generator(kit, ids, max_tokens=16, interventions=noop)]
    assert edited == plain
    np.testing.assert_array_equal(
        np.array(mlx_engine.run_with_cache(kit, ids, interventions=noop).logits), np.array(mlx_engine.run_with_cache(kit, ids).logits)
    )


def test_generated_positions_leave_the_prompt_alone_and_match_transformers(arch) -> None:
    name, kit, model = arch
    ids = mlx_engine.tokenize(kit, PROMPT)
    n = len(ids)
    layer = 1
    v = np.random.default_rng(1).normal(size=kit.arch_info.d_model).astype(np.float32)
    steer = {"layer_name": layer, "component": "residual", "op": "add", "vector": v, "scale": 4.0, "positions": "generated"}
    hooks = [{"layer_name": "final_norm", "component": "layernorm"}]
    plain = list(mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=8))
    steered = list(mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=8, interventions=[steer]))
    # The prompt's pass is untouched: same captures, same first token and logprob.
    np.testing.assert_array_equal(np.array(plain[0][1]["final_norm"][0].array), np.array(steered[0][1]["final_norm"][0].array))
    assert plain[0][0].token == steered[0][0].token and plain[0][0].logprob == steered[0][0].logprob
    tokens = [r.token for r, _ in steered]
    assert tokens != [r.token for r, _ in plain], "the steering must change the continuation"

    ref = EditedReference(model)
    ref.on_output(ref.block(layer), masked(lambda t: t + torch.from_numpy(v * np.float32(4.0)), row_mask(n + 7, kit.arch_info.d_model, list(range(n, n + 7)))))
    logits = ref.logits(ids + tokens[:-1])
    assert logits[n - 1 :].argmax(-1).tolist() == tokens


def test_capture_before_and_after_an_edit_at_the_same_hook(llama_kit) -> None:
    kit = llama_kit
    ids = mlx_engine.tokenize(kit, PROMPT)
    v = np.random.default_rng(2).normal(size=kit.arch_info.d_model).astype(np.float32)
    hooks = [
        {"layer_name": 1, "component": "residual", "hook_id": "pre", "edit": "before"},
        {"layer_name": 1, "component": "residual", "hook_id": "post", "edit": "after"},
        {"layer_name": 1, "component": "mlp", "hook_id": "default"},
        {"layer_name": 1, "component": "mlp", "hook_id": "mlp_pre", "edit": "before"},
        {"layer_name": 2, "component": "residual", "capture_input": True, "capture_output": False, "hook_id": "downstream"},
        {"layer_name": 0, "component": "residual", "hook_id": "elsewhere", "edit": "before"},
    ]
    interventions = [
        {"layer_name": 1, "component": "residual", "op": "add", "vector": v, "scale": 2.0},
        {"layer_name": 1, "component": "mlp", "op": "zero", "indices": [3, 9]},
    ]
    result = mlx_engine.run_with_cache(kit, ids, hooks, interventions=interventions)
    pre, post = np.array(result["pre"]), np.array(result["post"])
    np.testing.assert_array_equal(post, pre + v * np.float32(2.0))
    mlp_pre, mlp_post = np.array(result["mlp_pre"]), np.array(result["default"])
    expected = mlp_pre.copy()
    expected[:, [3, 9]] = 0.0
    np.testing.assert_array_equal(mlp_post, expected)
    assert np.abs(mlp_pre[:, [3, 9]]).min() > 0
    np.testing.assert_array_equal(np.array(result["downstream"]), post)
    edits = {k: c.edit for k, c in result.activations.items()}
    assert edits == {"pre": "before", "post": "after", "default": "after", "mlp_pre": "before", "downstream": None, "elsewhere": None}
    assert result.activations["pre"].metadata()["edit"] == "before"
    assert "edit" not in result.activations["downstream"].metadata()

    # The same in a generation, step by step.
    for _, acts in mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=3, interventions=interventions):
        for a, b in zip(acts["pre"], acts["post"]):
            np.testing.assert_array_equal(np.array(b.array), np.array(a.array) + v * np.float32(2.0))


def test_seeded_steered_sampling_is_repeatable(llama_kit) -> None:
    ids = mlx_engine.tokenize(llama_kit, PROMPT)
    v = np.random.default_rng(3).normal(size=llama_kit.arch_info.d_model).astype(np.float32)
    steer = [{"layer_name": 1, "component": "residual", "op": "add", "vector": v, "scale": 3.0}]
    run = lambda seed, iv: [r.token for r in mlx_engine.create_generator(llama_kit, ids, max_tokens=16, temp=1.0, seed=seed, interventions=iv)]
    assert run(5, steer) == run(5, steer)
    assert run(5, steer) != run(5, [])


def test_mean_ablation_from_stored_captures(llama_kit) -> None:
    kit = llama_kit
    prompts = [mlx_engine.tokenize(kit, p) for p in (PROMPT, OTHER)]
    caches = [mlx_engine.run_with_cache(kit, p, [{"layer_name": 1, "component": "z"}, {"layer_name": 1, "component": "mlp"}]) for p in prompts]
    z_mean = np.concatenate([np.array(c["layers.1.z"]) for c in caches], axis=1).mean(axis=1)  # [H, D]
    mlp_mean = np.concatenate([np.array(c["layers.1.mlp"]) for c in caches]).mean(axis=0)  # [d]
    by_source = [
        {"layer_name": 1, "component": "z", "op": "mean", "source": caches, "heads": [2]},
        {"layer_name": 1, "component": "mlp", "op": "mean", "source": caches, "indices": [0, 1, 2]},
    ]
    by_values = [
        {"layer_name": 1, "component": "z", "op": "mean", "values": z_mean, "heads": [2]},
        {"layer_name": 1, "component": "mlp", "op": "mean", "values": mlp_mean, "indices": [0, 1, 2]},
    ]
    hooks = [{"layer_name": 1, "component": "z"}, {"layer_name": 1, "component": "mlp"}]
    a = mlx_engine.run_with_cache(kit, prompts[0], hooks, interventions=by_source)
    b = mlx_engine.run_with_cache(kit, prompts[0], hooks, interventions=by_values)
    np.testing.assert_allclose(np.array(a.logits), np.array(b.logits), atol=1e-5)
    z = np.array(a["layers.1.z"])
    np.testing.assert_allclose(z[2], np.broadcast_to(z_mean[2][None], z[2].shape), atol=1e-6)
    np.testing.assert_array_equal(z[[0, 1, 3]], np.array(caches[0]["layers.1.z"])[[0, 1, 3]])
    # The server's path: a capture_id naming a stored capture.
    (stored,) = prepare_interventions(
        kit, [{"layer_name": 1, "component": "mlp", "op": "mean", "capture_id": "run-7"}], prompt_len=len(prompts[0]), sources={"run-7": caches[1]}
    )
    expected_vector = np.array(caches[1]["layers.1.mlp"]).mean(axis=0)
    one = mlx_engine.run_with_cache(kit, prompts[0], interventions=[stored])
    two = mlx_engine.run_with_cache(kit, prompts[0], interventions=[{"layer_name": 1, "component": "mlp", "op": "mean", "values": expected_vector}])
    np.testing.assert_allclose(np.array(one.logits), np.array(two.logits), atol=1e-5)


def test_chunked_prefill_edits_the_right_rows(llama_kit) -> None:
    kit = llama_kit
    ids = mlx_engine.tokenize(kit, PROMPT * 2)
    hooks = [{"layer_name": 2, "component": "residual"}]
    interventions = [{"layer_name": 1, "component": "mlp", "op": "zero", "positions": [3, 6, 7, 15]}]
    whole = mlx_engine.run_with_cache(kit, ids, hooks, interventions=interventions)
    (_, step0), *_ = mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=2, prefill_step_size=5, interventions=interventions)
    chunked = np.concatenate([np.array(c.array) for c in step0["layers.2.residual"]])
    same_chunks = mlx_engine.run_with_cache(kit, ids, hooks, interventions=interventions, prefill_step_size=5)
    np.testing.assert_allclose(chunked, np.array(same_chunks["layers.2.residual"]), atol=1e-5)
    # Against one forward the only difference is the BLAS's summation order over other chunk sizes.
    np.testing.assert_allclose(chunked, np.array(whole["layers.2.residual"]), atol=1e-4)
    plain = np.array(mlx_engine.run_with_cache(kit, ids, hooks, prefill_step_size=5)["layers.2.residual"])
    changed = np.abs(chunked - plain).max(axis=-1) > 1e-6
    assert not changed[:3].any() and changed[3]


def test_steering_vector_is_a_difference_of_mean_residuals(llama_kit) -> None:
    kit = llama_kit
    pos = ["x = [1, 2, 3, 4]\n", "return 42"]
    neg = ["def name(self):\n", "pass"]
    sv = mlx_engine.steering_vector(kit, pos, neg, "model.layers.1")
    hook = [{"layer_name": 1, "component": "residual"}]
    bos = kit.tokenizer.bos_token_id

    def mean(prompts: list[str], last: bool) -> np.ndarray:
        per = []
        for p in prompts:
            ids = mlx_engine.tokenize(kit, p)
            rows = np.array(mlx_engine.run_with_cache(kit, ids, hook)["layers.1.residual"])
            per.append(rows[-1] if last else rows[1:].mean(0) if ids[0] == bos else rows.mean(0))
        return np.mean(per, axis=0)

    np.testing.assert_allclose(np.array(sv.vector), mean(pos, False) - mean(neg, False), atol=1e-5)
    last = mlx_engine.steering_vector(kit, pos, neg, 1, last_token_only=True)
    np.testing.assert_allclose(np.array(last.vector), mean(pos, True) - mean(neg, True), atol=1e-5)
    iv = sv.intervention(scale=2.0, positions="generated")
    assert iv["layer_name"] == "layers.1" and iv["op"] == "add" and iv["scale"] == 2.0
    mlx_engine.run_with_cache(kit, mlx_engine.tokenize(kit, PROMPT), interventions=[iv])
    with pytest.raises(InterventionError, match=r"'z' is not one") as err:
        mlx_engine.steering_vector(kit, pos, neg, 1, component="z")
    assert err.value.param == "component"
    with pytest.raises(InterventionError, match=r"'negative' must be a non-empty list"):
        mlx_engine.steering_vector(kit, pos, [], 1)


# (intervention, message pattern, param) against gpt-oss (4 layers, d_model 64, 4 heads, 2 kv heads,
# head_dim 16) with an 8-token prompt and max_tokens 4: positions 0..10 pass through the model.
BAD = [
    ({"layer_name": 1, "component": "residual", "op": "multiply"}, r"unknown op 'multiply'; valid ops: add, zero, mean, clamp, scale, patch", "op"),
    ({"layer_name": 1, "component": "residual"}, r"'op' is missing; valid ops: add", "op"),
    ({"layer_name": "decoder.x", "component": "residual", "op": "zero"}, r"Unknown layer name 'decoder.x'; valid layer names: 0..3", "layer_name"),
    ({"layer_name": 99, "component": "residual", "op": "zero"}, r"Layer 99 is out of range: this model has 4 layers \(0..3\)", "layer_name"),
    ({"layer_name": 1, "component": "resid", "op": "zero"}, r"Unknown component 'resid'; valid components for this model: residual", "component"),
    ({"layer_name": 1, "component": "attention_pattern", "op": "zero"}, r"component 'attention_pattern' cannot be edited; interventions act on: embedding, residual", "component"),
    ({"layer_name": 1, "component": "residual", "op": "add"}, r"op 'add' needs 'vector'", "vector"),
    ({"layer_name": 1, "component": "residual", "op": "add", "vector": [0.5] * 63}, r"vector for layers.1.residual must have shape \[64\], got \[63\]", "vector"),
    ({"layer_name": 1, "component": "z", "op": "add", "vector": [[0.0] * 16] * 3}, r"vector for layers.1.z must have shape \[4, 16\] or \[16\] \(added to each chosen head\), got \[3, 16\]", "vector"),
    ({"layer_name": 1, "component": "residual", "op": "add", "vector": [1.0, float("nan")] + [0.0] * 62}, r"'vector' contains NaN or infinite values", "vector"),
    ({"layer_name": 1, "component": "mlp", "op": "zero", "indices": [3, 64]}, r"index 64 is out of range: layers.1.mlp has 64 features per position \(0..63\)", "indices"),
    ({"layer_name": 1, "component": "mlp", "op": "zero", "indices": [3, 3]}, r"'indices' repeats \[3\]", "indices"),
    ({"layer_name": 1, "component": "z", "op": "zero", "heads": [4]}, r"head 4 is out of range: layers.1.z has 4 heads \(0..3\)", "heads"),
    ({"layer_name": 1, "component": "key", "op": "zero", "heads": [2]}, r"head 2 is out of range: layers.1.key has 2 heads \(0..1\)", "heads"),
    ({"layer_name": 1, "component": "residual", "op": "zero", "heads": [0]}, r"'heads' applies to query, key, value and z; layers.1.residual has no head axis", "heads"),
    ({"layer_name": 1, "component": "residual", "op": "zero", "positions": "later"}, r"positions must be 'all', 'prompt', 'generated' or a list of token positions, got 'later'", "positions"),
    ({"layer_name": 1, "component": "residual", "op": "zero", "positions": [0, 11]}, r"position 11 is out of range: this run passes positions 0..10 through the model \(a 8-token prompt", "positions"),
    ({"layer_name": 1, "component": "residual", "op": "zero", "positions": 1.5}, r"positions must be .* got 1.5", "positions"),
    ({"layer_name": 1, "component": "residual", "op": "zero", "positions": [2, "3"]}, r"'positions' must hold integers only, got '3'", "positions"),
    ({"layer_name": 1, "component": "residual", "op": "zero", "positions": [-1]}, r"absolute token positions \(0 and up\)", "positions"),
    ({"layer_name": 1, "component": "residual", "op": "clamp"}, r"op 'clamp' needs 'min', 'max' or both", "min"),
    ({"layer_name": 1, "component": "residual", "op": "clamp", "min": 2, "max": 1}, r"'min' \(2.0\) is greater than 'max' \(1.0\)", "min"),
    ({"layer_name": 1, "component": "residual", "op": "scale"}, r"op 'scale' needs 'scale'", "scale"),
    ({"layer_name": 1, "component": "residual", "op": "scale", "scale": "big"}, r"'scale' must be a number, got 'big'", "scale"),
    ({"layer_name": 1, "component": "residual", "op": "patch"}, r"op 'patch' needs a source: 'values' \(array\), 'source'", "values"),
    ({"layer_name": 1, "component": "residual", "op": "patch", "values": np.zeros((5, 32))}, r"the patch source for layers.1.residual must have shape \[T, 64\], got \[5, 32\]", "values"),
    ({"layer_name": 1, "component": "residual", "op": "patch", "values": np.zeros((5, 64)), "positions": [2, 7]}, r"the patch source covers positions 0..4; position 7 is outside it", "positions"),
    ({"layer_name": 1, "component": "residual", "op": "patch", "capture_id": "nope"}, r"no stored capture 'nope'; stored: none", "capture_id"),
    ({"layer_name": 1, "component": "z", "op": "mean", "values": np.zeros((3, 16))}, r"the mean source for layers.1.z .* must have shape \[4, T, 16\], got \[3, 16\]", "values"),
    ({"layer_name": 1, "component": "residual", "op": "add", "vector": [0.0] * 64, "min": 1}, r"field does not apply to op 'add' 'min'; op 'add' takes: ", "min"),
    ({"layer_name": 1, "component": "residual", "op": "zero", "colour": "red"}, r"unknown field 'colour'", "colour"),
    ([1, "residual", "zero"], r"an intervention is a dict like", None),
]


@pytest.mark.parametrize("bad, message, field", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_invalid_interventions_are_refused_before_generating(gpt_oss_kit, bad, message: str, field: Optional[str]) -> None:
    kit = gpt_oss_kit
    ids = mlx_engine.tokenize(kit, PROMPT)[:8]
    with pytest.raises(InterventionError, match=message) as err:
        mlx_engine.create_generator_with_activations(kit, ids, [], max_tokens=4, interventions=[{"layer_name": 0, "component": "mlp", "op": "scale", "scale": 2.0}, bad])
    expected_param = "interventions[1]" + (f".{field}" if field else "")
    assert err.value.param == expected_param
    assert str(err.value).startswith(expected_param + ": ")
    assert isinstance(err.value, ValueError) and isinstance(err.value, HookSpecError)
    assert not any(p.armed for p in kit.hook_points.values())
    with pytest.raises(InterventionError, match=message):
        mlx_engine.create_generator(kit, ids, max_tokens=4, interventions=[bad, bad])


def test_other_refusals(gpt_oss_kit) -> None:
    kit = gpt_oss_kit
    ids = mlx_engine.tokenize(kit, PROMPT)
    with pytest.raises(HookSpecError, match=r"'edit' must be 'before' or 'after'") as err:
        mlx_engine.run_with_cache(kit, ids, [{"layer_name": 1, "component": "residual", "edit": "during"}])
    assert err.value.param == "activation_hooks[0].edit"
    cache = mlx_engine.run_with_cache(kit, ids, [{"layer_name": 1, "component": "mlp"}])
    with pytest.raises(InterventionError, match=r"the source has no capture 'layers.1.residual'; it holds: layers.1.mlp"):
        mlx_engine.run_with_cache(kit, ids, interventions=[{"layer_name": 1, "component": "residual", "op": "patch", "source": cache}])
    with pytest.raises(InterventionError, match=r"covers positions 0..%d, none of the positions 'generated'" % (len(ids) - 1)):
        mlx_engine.create_generator_with_activations(
            kit, ids, max_tokens=4, interventions=[{"layer_name": 1, "component": "mlp", "op": "patch", "source": cache, "positions": "generated"}]
        )
    (resolved,) = prepare_interventions(kit, [{"layer_name": 1, "component": "mlp", "op": "zero"}], prompt_len=len(ids))
    with pytest.raises(InterventionError, match=rf"resolved for a {len(ids)}-token prompt, not 3"):
        mlx_engine.run_with_cache(kit, ids[:3], interventions=[resolved])
    assert resolved.metadata() == {
        "index": 0, "hook_id": "layers.1.mlp", "layer_name": "layers.1", "layer": 1, "component": "mlp",
        "is_input": False, "op": "zero", "positions": "all",
    }
    assert parse_intervention({"layer_name": 1, "op": "zero", "positions": 3}).positions == (3,)
    assert set(OPS) == {"add", "zero", "mean", "clamp", "scale", "patch", "topk"}


def test_edits_arm_only_their_hooks_and_disarm_when_closed(llama_kit) -> None:
    kit = llama_kit
    ids = mlx_engine.tokenize(kit, PROMPT)
    gen = mlx_engine.create_generator(kit, ids, max_tokens=20, interventions=[{"layer_name": 0, "component": "mlp", "op": "scale", "scale": 0.5}])
    next(gen)
    assert [name for name, p in kit.hook_points.items() if p.armed] == ["layers.0.mlp"]
    gen.close()
    assert not any(p.armed for p in kit.hook_points.values())
    plain = [r.token for r in mlx_engine.create_generator(kit, ids, max_tokens=6, interventions=None)]
    assert plain == [r.token for r in mlx_engine.create_generator(kit, ids, max_tokens=6)]
