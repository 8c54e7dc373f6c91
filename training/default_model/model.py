"""The model and its optimiser: a tiny gpt-oss, and how its parameters are updated.

The architecture is gpt-oss's own (top-k routed experts, attention sinks, alternating
sliding-window and full attention, YaRN RoPE with ``truncate: false``), so every code path a
real gpt-oss checkpoint takes through the engine is exercised by the default model.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

# Real gpt-oss's RoPE: YaRN stretching a 4096-position original context 32-fold, without
# truncating the correction range, so the engine's YaRN path is exercised as it is for gpt-oss.
YARN_ROPE_PARAMETERS = {
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def build_model(args: argparse.Namespace, tokenizer: Any) -> Any:
    """A freshly initialised GptOssForCausalLM sized by ``args``, with the tokenizer's
    Harmony stop tokens as its generation stops (initialisation draws on torch's global RNG,
    so seed it first)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)]
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.expert_hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        sliding_window=args.sliding_window,
        layer_types=layer_types,
        max_position_embeddings=131072,
        rope_parameters=dict(YARN_ROPE_PARAMETERS),
        tie_word_embeddings=False,
        attention_bias=True,
        router_aux_loss_coef=args.router_aux_coef,
        output_router_logits=False,
        initializer_range=0.02,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|return|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    model = GptOssForCausalLM(config)
    # Eager attention is the only exact CPU path with sinks (gpt-oss has no SDPA support);
    # grouped_mm computes the same experts as the eager per-expert loop, faster.
    model.set_attn_implementation("eager")
    model.set_experts_implementation(args.experts_implementation)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|endoftext|>", "<|call|>")]
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.bos_token_id = None
    return model


def count_parameters(model: Any, args: argparse.Namespace) -> tuple[int, int]:
    """All parameters, and those one token uses: every expert but the ``top_k`` chosen ones
    sits idle for a given token, which is what makes a mixture-of-experts cheap to run."""
    n_params = sum(p.numel() for p in model.parameters())
    experts = model.model.layers[0].mlp.experts
    per_expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
    n_active = n_params - args.layers * (args.experts - args.top_k) * per_expert
    return n_params, n_active


def parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm gains and attention sinks are offsets whose
    natural value is not zero, so pulling them towards zero only hurts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "norm" in name or name.endswith("sinks"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: Any, args: argparse.Namespace) -> Any:
    """AdamW with betas (0.9, 0.95), the usual choice for transformer pretraining: the lower
    beta2 adapts faster to the gradient scale changes of an early, short run."""
    import torch

    return torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=False
    )


def learning_rate(step: int, progress: float, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup, then cosine to ``min_ratio * peak`` over the run's progress in [0, 1]
    (progress is elapsed time over the budget, or steps over --max-steps)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
