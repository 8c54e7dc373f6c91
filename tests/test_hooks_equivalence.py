"""Every component at every layer equals what transformers computes, prompt and decode.

The reference is transformers (float32, eager attention) on the same weights. Its
tensors are read through torch forward hooks on its modules, and q/k/v, scores and
probabilities through an attention function registered with transformers'
AttentionInterface that records the arguments its own eager attention receives.
Our decode-step captures are compared with the matching rows of one reference
forward over the prompt plus the generated tokens.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

import mlx_engine
import tiny_checkpoints as tc

ATOL = 1e-4  # float32 on both sides; activations are O(1)-O(10)
RTOL = 1e-4
DECODE_STEPS = 4  # captures for the prompt plus 3 decode steps
PROMPT = "def encode(self, obj):\n    return json.dumps(obj, indent=4)\n"

def build_gpt_oss_4bit(path: Path):
    """A 4-bit MLX conversion of the tiny gpt-oss; its reference gets the dequantized weights."""
    from mlx_engine.tools.convert import quantize_checkpoint

    float_path, _ = tc.build_gpt_oss(path / "float")
    return quantize_checkpoint(float_path, path / "q4", bits=4, group_size=32), None


def dequantized_gpt_oss_reference(kit: Any, float_path: Path) -> Any:
    """transformers' GptOss carrying exactly the weights our 4-bit model computes with."""
    import mlx.core as mx

    reference = tc.load_reference(float_path, "GptOssForCausalLM")

    def weight(module: Any) -> np.ndarray:
        if hasattr(module, "scales"):
            w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits, mode=module.mode)
        else:
            w = module.weight
        return np.array(w.astype(mx.float32))

    state: dict[str, np.ndarray] = {"model.embed_tokens.weight": weight(kit.model.model.embed_tokens), "lm_head.weight": weight(kit.model.lm_head)}
    for i, layer in enumerate(kit.model.layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, name)
            state[f"{p}.self_attn.{name}.weight"] = weight(proj)
            state[f"{p}.self_attn.{name}.bias"] = np.array(proj.bias)
        state[f"{p}.mlp.router.weight"] = weight(layer.mlp.router)
        state[f"{p}.mlp.router.bias"] = np.array(layer.mlp.router.bias)
        experts = layer.mlp.experts
        gate, up, down = weight(experts.gate_proj), weight(experts.up_proj), weight(experts.down_proj)
        gate_up = np.empty((gate.shape[0], gate.shape[2], 2 * gate.shape[1]), dtype=np.float32)
        gate_up[..., ::2], gate_up[..., 1::2] = gate.transpose(0, 2, 1), up.transpose(0, 2, 1)
        bias = np.empty((gate.shape[0], 2 * gate.shape[1]), dtype=np.float32)
        bias[..., ::2], bias[..., 1::2] = np.array(experts.gate_proj.bias), np.array(experts.up_proj.bias)
        state[f"{p}.mlp.experts.gate_up_proj"] = gate_up
        state[f"{p}.mlp.experts.gate_up_proj_bias"] = bias
        state[f"{p}.mlp.experts.down_proj"] = down.transpose(0, 2, 1)
        state[f"{p}.mlp.experts.down_proj_bias"] = np.array(experts.down_proj.bias)
    missing = set(reference.state_dict()) - set(state)
    assert all("norm" in k or "sinks" in k for k in missing), missing
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    return reference


ARCHS: dict[str, tuple[Callable[..., Any], str, str]] = {
    "llama": (lambda p: tc.build_llama(p, "llama"), "LlamaForCausalLM", "llama"),
    "qwen2": (lambda p: tc.build_llama(p, "qwen2"), "Qwen2ForCausalLM", "qwen2"),
    "mistral": (lambda p: tc.build_llama(p, "mistral"), "MistralForCausalLM", "mistral"),
    "gpt2": (tc.build_gpt2, "GPT2LMHeadModel", "gpt2"),
    "gpt_oss": (tc.build_gpt_oss, "GptOssForCausalLM", "gpt_oss"),
    "gpt_oss_4bit": (build_gpt_oss_4bit, "GptOssForCausalLM", "gpt_oss"),
}


class Reference:
    """One transformers forward with every intermediate tensor recorded."""

    def __init__(self, model: Any, module_name: str) -> None:
        self.model = model
        self.modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        self.t: dict[str, np.ndarray] = {}

    def _blocks(self) -> list[Any]:
        return list(self.model.transformer.h) if hasattr(self.model, "transformer") else list(self.model.model.layers)

    def run(self, ids: list[int]) -> None:
        hooks = []
        eager = self.modeling.eager_attention_forward
        store = self.t

        def first(x: Any) -> torch.Tensor:
            return x[0] if isinstance(x, tuple) else x

        for i, block in enumerate(self._blocks()):
            attn = block.attn if hasattr(block, "attn") else block.self_attn
            norm1 = block.ln_1 if hasattr(block, "ln_1") else block.input_layernorm
            norm2 = block.ln_2 if hasattr(block, "ln_2") else block.post_attention_layernorm
            mlp = block.mlp

            def save(key: str, fn: Callable[[Any, Any, Any], torch.Tensor] = lambda m, a, o: first(o)):
                def hook(module: Any, args: Any, output: Any) -> None:
                    store[key] = fn(module, args, output).detach()[0].float().numpy()

                return hook

            hooks += [
                block.register_forward_hook(save(f"{i}.residual")),
                block.register_forward_hook(save(f"{i}.resid_pre", lambda m, a, o: a[0])),
                norm1.register_forward_hook(save(f"{i}.layernorm")),
                attn.register_forward_hook(save(f"{i}.attention")),
                norm2.register_forward_hook(save(f"{i}.mlp_in")),
                mlp.register_forward_hook(save(f"{i}.mlp")),
            ]
            hooks.append(norm2.register_forward_hook(save(f"{i}.resid_mid", lambda m, a, o: a[0])))
            if hasattr(mlp, "router"):
                hooks.append(mlp.router.register_forward_hook(save(f"{i}.router", lambda m, a, o: o[0][None])))
            else:  # the dense MLP's neurons: the gate (c_fc) output and the down projection's (c_proj's) input
                pre = mlp.c_fc if hasattr(mlp, "c_fc") else mlp.gate_proj
                down = mlp.c_proj if hasattr(mlp, "c_fc") else mlp.down_proj
                hooks.append(pre.register_forward_hook(save(f"{i}.mlp_pre")))
                hooks.append(down.register_forward_hook(save(f"{i}.mlp_post", lambda m, a, o: a[0])))
            attn._capture_layer = i

        def recording_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any):
            i = module._capture_layer
            scaling = kwargs.get("scaling", module.scaling if hasattr(module, "scaling") else query.shape[-1] ** -0.5)
            store[f"{i}.query"] = query[0].detach().numpy()
            store[f"{i}.key"] = key[0].detach().numpy()
            store[f"{i}.value"] = value[0].detach().numpy()
            groups = query.shape[1] // key.shape[1]
            k = key.repeat_interleave(groups, dim=1)
            scores = torch.matmul(query, k.transpose(2, 3)) * scaling
            assert attention_mask is not None, "the reference must build an explicit (eager) mask"
            allowed = attention_mask[:, :, :, : k.shape[-2]] == 0
            store[f"{i}.attention_scores"] = scores[0].detach().numpy()
            store[f"{i}.allowed"] = allowed[0].expand_as(scores[0]).numpy()
            out, weights = eager(module, query, key, value, attention_mask, **kwargs)
            store[f"{i}.attention_pattern"] = weights[0].detach().numpy()
            store[f"{i}.z"] = out[0].transpose(0, 1).detach().numpy()  # [H, T, D]
            return out, weights

        AttentionInterface.register("recording_eager", recording_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register("recording_eager", eager_mask)
        self.model.config._attn_implementation = "recording_eager"
        for module in self.model.modules():
            if hasattr(module, "config") and module.config is not self.model.config:
                module.config._attn_implementation = "recording_eager"
        try:
            with torch.no_grad():
                out = self.model(torch.tensor([ids]), output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        store["embedding"] = out.hidden_states[0][0].numpy()
        store["final_norm"] = out.hidden_states[-1][0].numpy()
        store["logits"] = out.logits[0].numpy()


def all_hooks(kit) -> list[dict[str, Any]]:
    points = mlx_engine.ActivationHookManager(kit).hook_points()
    hooks: list[dict[str, Any]] = [{"layer_name": "embedding", "component": "embedding"}, {"layer_name": "final_norm", "component": "layernorm"}]
    for layer in points["layers"]:
        for component, desc in layer["components"].items():
            if component in EXPERT_SITES:
                continue
            hooks.append({"layer_name": layer["name"], "component": component})
            if desc["supports_input"]:
                hooks.append({"layer_name": layer["name"], "component": component, "capture_input": True, "capture_output": False})
    return hooks


REF_KEY = {  # (component, is_input) -> reference tensor name
    ("residual", False): "residual",
    ("residual", True): "resid_pre",
    ("attention", False): "attention",
    ("attention", True): "layernorm",
    ("mlp", False): "mlp",
    ("mlp", True): "mlp_in",
    ("layernorm", False): "layernorm",
    ("layernorm", True): "resid_pre",
    ("query", False): "query",
    ("key", False): "key",
    ("value", False): "value",
    ("z", False): "z",
    ("router", False): "router",
    ("resid_mid", False): "resid_mid",
    ("mlp_pre", False): "mlp_pre",
    ("mlp_post", False): "mlp_post",
}
# The routed experts' units are checked against transformers' expert computation in test_neuron_sites.py.
EXPERT_SITES = ("expert_pre", "expert_post")


def compare(capture: Any, ref: dict[str, np.ndarray], n_layers: int) -> None:
    ours = np.array(capture.array, dtype=np.float32)
    start, end = capture.positions
    comp = capture.component
    what = f"{capture.hook_id} step {capture.step} rows {start}:{end}"
    if capture.layer is None:
        expected = ref[capture.layer_name][start:end]
        np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)
        return
    i = capture.layer
    if comp in ("attention_scores", "attention_pattern"):
        keys = np.array(capture.key_positions)
        full = ref[f"{i}.{comp}"][:, start:end]
        allowed = ref[f"{i}.allowed"][:, start:end]
        expected = full[:, :, keys]
        if comp == "attention_scores":
            ok = allowed[:, :, keys]
            assert np.all(np.isneginf(ours[~ok])), what
            np.testing.assert_allclose(ours[ok], expected[ok], atol=ATOL, rtol=RTOL, err_msg=what)
        else:
            np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)
            # Keys outside the reported columns carry no probability in the reference.
            rest = np.setdiff1d(np.arange(full.shape[-1]), keys)
            assert np.abs(full[:, :, rest]).max(initial=0.0) < 1e-6, what
        return
    expected = ref[f"{i}.{REF_KEY[(comp, capture.is_input)]}"]
    if comp in ("query", "key", "value", "z"):
        expected = expected[:, start:end]
    else:
        expected = expected[start:end]
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)
    if comp == "router":
        top = np.sort(np.argsort(-expected, axis=-1)[:, : capture.extras["experts"].shape[-1]], axis=-1)
        assert np.array_equal(np.sort(np.array(capture.extras["experts"]), axis=-1), top), what
        np.testing.assert_allclose(np.array(capture.extras["weights"]).sum(-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    build, cls_name, module_name = ARCHS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    path, _ = build(root)
    kit = mlx_engine.load_model(path)
    if request.param == "gpt_oss_4bit":
        assert kit.config["quantization"]["bits"] == 4
        reference = dequantized_gpt_oss_reference(kit, root / "float")
    else:
        reference = tc.load_reference(path, cls_name)
    return request.param, kit, reference, module_name


def test_every_component_every_layer_matches_transformers(arch) -> None:
    name, kit, reference, module_name = arch
    ids = mlx_engine.tokenize(kit, PROMPT)
    assert len(ids) > 8, "the prompt must be longer than the sliding window"
    hooks = all_hooks(kit)
    steps = list(mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=DECODE_STEPS))
    generated = [r.token for r, _ in steps]
    ref = Reference(reference, module_name)
    ref.run(ids + generated[:-1])
    n_layers = kit.arch_info.num_layers
    seen_steps = set()
    for result, activations in steps:
        assert set(activations) == {h for h in _hook_ids(kit, hooks)}
        for hook_id, captures in activations.items():
            for capture in captures:
                assert capture.step == result.step
                compare(capture, ref.t, n_layers)
                seen_steps.add(capture.step)
    assert seen_steps == set(range(DECODE_STEPS))
    # The token chosen at each step is the reference's argmax at that row.
    ref_choice = ref.t["logits"][len(ids) - 1 :].argmax(-1)
    assert generated == ref_choice.tolist()


def _hook_ids(kit, hooks) -> list[str]:
    return [r.hook_id for r in kit.resolve_hooks(hooks)]


def test_capturing_everything_changes_no_token(arch) -> None:
    name, kit, _, _ = arch
    ids = mlx_engine.tokenize(kit, PROMPT)
    plain = [r.token for r in mlx_engine.create_generator(kit, ids, max_tokens=24)]
    captured = [r.token for r, _ in mlx_engine.create_generator_with_activations(kit, ids, all_hooks(kit), max_tokens=24)]
    assert plain == captured


def test_sliding_window_layers_report_window_key_positions(arch) -> None:
    name, kit, _, _ = arch
    info = kit.arch_info
    if info.sliding_window is None or "sliding_attention" not in info.layer_types:
        pytest.skip(f"{name} has no sliding-window layers")
    layer = info.layer_types.index("sliding_attention")
    ids = mlx_engine.tokenize(kit, PROMPT)
    window = info.sliding_window
    hooks = [{"layer_name": layer, "component": "attention_pattern"}]
    for result, acts in mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=window + 4):
        (capture,) = acts[f"layers.{layer}.attention_pattern"]
        if result.step == 0:
            continue
        position = capture.positions[0]
        assert capture.key_positions == list(range(position - window + 1, position + 1))
        assert capture.shape[-1] == window
