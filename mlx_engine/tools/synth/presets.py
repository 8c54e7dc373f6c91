"""The named architectures `synth` can imitate: their published config.json, verbatim.

The values are copied from the published checkpoints (openai/gpt-oss-*, meta-llama/
Llama-3.*) rather than derived, because the point of a synthetic checkpoint is to have
exactly the real model's shapes; tests/test_synth.py types them in again independently
so that a slip here fails. Nothing in this module needs numpy or MLX, so the command
line can list the choices without loading either.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

YARN_GPT_OSS: dict[str, Any] = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "rope_type": "yarn",
    "truncate": False,
}
LLAMA3_ROPE: dict[str, Any] = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def _alternating_layer_types(layers: int) -> list[str]:
    """gpt-oss alternates sliding-window and full attention, starting with sliding."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _gpt_oss(layers: int, experts: int, **extra: Any) -> dict[str, Any]:
    """A gpt-oss config; the family shares everything but depth and expert count, and
    `extra` reshapes it for the smaller benchmark variant."""
    config = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "experts_per_token": 4,
        "num_experts_per_tok": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "intermediate_size": 2880,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "num_local_experts": experts,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(YARN_GPT_OSS),
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 201088,
        "use_cache": True,
    }
    config.update(extra)
    config["layer_types"] = _alternating_layer_types(config["num_hidden_layers"])
    return config


def _llama(**fields: Any) -> dict[str, Any]:
    """A Llama config: the keys every Llama shares, plus the size-specific `fields`."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "mlp_bias": False,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    config.update(fields)
    return config


# The published configs (openai/gpt-oss-*, meta-llama/Llama-3.*), plus two smaller
# shapes for benchmarks: a GPT-3-Small-sized Llama and a gpt-oss-shaped MoE under 1B.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": _gpt_oss(24, 32),
    "gpt-oss-120b": _gpt_oss(36, 128),
    "gpt-oss-moe-1b": _gpt_oss(
        12,
        32,
        hidden_size=768,
        intermediate_size=512,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "llama-1b": _llama(
        bos_token_id=128000,
        eos_token_id=128001,
        head_dim=64,
        hidden_size=2048,
        intermediate_size=8192,
        max_position_embeddings=131072,
        num_attention_heads=32,
        num_hidden_layers=16,
        num_key_value_heads=8,
        rope_scaling=dict(LLAMA3_ROPE),
        rope_theta=500000.0,
        tie_word_embeddings=True,
        vocab_size=128256,
    ),
    "llama-8b": _llama(
        bos_token_id=128000,
        eos_token_id=128001,
        head_dim=128,
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=131072,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
        rope_theta=500000.0,
        tie_word_embeddings=False,
        vocab_size=128256,
    ),
    "llama-125m": _llama(
        bos_token_id=1,
        eos_token_id=2,
        head_dim=64,
        hidden_size=768,
        intermediate_size=2048,
        max_position_embeddings=2048,
        num_attention_heads=12,
        num_hidden_layers=12,
        num_key_value_heads=12,
        rope_scaling=None,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        vocab_size=32000,
    ),
}


def architecture_config(
    like: str, layers: Optional[int] = None, overrides: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    """The named architecture's config.json (old `rope_theta`/`rope_scaling` keys, which
    every reader understands), with `layers` and dotted-key `overrides` applied.

    The table entry is deep-copied so callers may edit the result freely. Changing the
    depth rebuilds `layer_types` too, so gpt-oss keeps one entry per layer.
    """
    if like not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {like!r}; known: {', '.join(sorted(ARCHITECTURES))}.")
    config = copy.deepcopy(ARCHITECTURES[like])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be at least 1, got {layers}.")
        config["num_hidden_layers"] = layers
        if "layer_types" in config:
            config["layer_types"] = _alternating_layer_types(layers)
    for key, value in (overrides or {}).items():
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return config
