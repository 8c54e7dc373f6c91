"""A reference for a checkpoint quantized for MLX: transformers' model carrying our weights, dequantized.

transformers cannot read MLX's packed weights, so the reference is built from the
checkpoint's config and loaded with exactly the weights our quantized model computes with,
each quantized matrix dequantized to float32. The comparison then checks everything but the
rounding of the weights: the forward code, the quantized matmuls, the loading.

Our parameter names are transformers' for most architectures; the two that differ are
converted here: GPT-2 (Conv1D weights stored [in, out] under `transformer.`) and gpt-oss
(the experts' gate and up projections fused and interleaved, stored [in, out]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import transformers

if TYPE_CHECKING:
    from ..loading import ModelKit

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def dequantized_parameters(model: Any) -> dict[str, np.ndarray]:
    """Every parameter of an MLX model as float32 numpy, quantized matrices dequantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out: dict[str, np.ndarray] = {}
    for prefix, module in model.named_modules():
        if not (hasattr(module, "scales") and hasattr(module, "bits")):
            continue
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits, mode=module.mode)
        out[f"{prefix}.weight"] = np.array(w.astype(mx.float32))
    quantized = {k.rpartition(".")[0] for k in out}
    for name, value in tree_flatten(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf in ("weight", "scales", "biases"):
            continue
        out[name] = np.array(value.astype(mx.float32))
    return out


def _gpt2(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        if key.startswith("model."):
            key = "transformer." + key.removeprefix("model.")
            if key.endswith(CONV1D):
                value = value.T
        out[key] = value
    return out


def _gpt_oss(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    prefixes = {k.split(".mlp.experts.")[0] for k in state if ".mlp.experts." in k}
    for p in prefixes:
        e = f"{p}.mlp.experts"
        gate, up = state[f"{e}.gate_proj.weight"], state[f"{e}.up_proj.weight"]  # [E, out, in]
        gate_up = np.empty((gate.shape[0], gate.shape[2], 2 * gate.shape[1]), dtype=np.float32)
        gate_up[..., ::2], gate_up[..., 1::2] = gate.transpose(0, 2, 1), up.transpose(0, 2, 1)
        bias = np.empty((gate.shape[0], 2 * gate.shape[1]), dtype=np.float32)
        bias[..., ::2], bias[..., 1::2] = state[f"{e}.gate_proj.bias"], state[f"{e}.up_proj.bias"]
        out[f"{e}.gate_up_proj"], out[f"{e}.gate_up_proj_bias"] = gate_up, bias
        out[f"{e}.down_proj"] = state[f"{e}.down_proj.weight"].transpose(0, 2, 1)
        out[f"{e}.down_proj_bias"] = state[f"{e}.down_proj.bias"]
    return out


TO_TRANSFORMERS: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {"gpt2": _gpt2, "gpt_oss": _gpt_oss}


def load_dequantized(kit: "ModelKit", attn_implementation: str) -> Any:
    """transformers' model from the checkpoint's config.json with our dequantized weights."""
    config = transformers.AutoConfig.from_pretrained(kit.path, local_files_only=True)
    for key in ("quantization", "quantization_config"):
        if hasattr(config, key):
            delattr(config, key)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    state = TO_TRANSFORMERS.get(kit.model_type, lambda s: s)(dequantized_parameters(kit.model))
    expected = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"cannot give transformers' {type(model).__name__} the dequantized weights of this {kit.model_type} "
            f"checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if tuple(expected[key].shape) != value.shape:
            raise ValueError(f"dequantized {key} has shape {value.shape}, transformers expects {tuple(expected[key].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model
