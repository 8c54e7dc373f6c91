"""The spellings a hook request may use for a site: block sites by component, TransformerLens
names, module paths, and the names of the embedding and the final norm.

Plain tables, read by names.py; a new alias is one line here.
"""

from __future__ import annotations

from typing import Optional

from .components import ComponentType

C = ComponentType

# (component, is_input) -> site inside a block
BLOCK_SITE_OF: dict[tuple[ComponentType, bool], str] = {
    (C.RESIDUAL, False): "residual",
    (C.RESIDUAL, True): "resid_pre",
    (C.ATTENTION, False): "attention",
    (C.ATTENTION, True): "layernorm",
    (C.MLP, False): "mlp",
    (C.MLP, True): "mlp_in",
    (C.LAYERNORM, False): "layernorm",
    (C.LAYERNORM, True): "resid_pre",
    (C.QUERY, False): "query",
    (C.KEY, False): "key",
    (C.VALUE, False): "value",
    (C.ATTENTION_SCORES, False): "attention_scores",
    (C.ATTENTION_PATTERN, False): "attention_pattern",
    (C.Z, False): "z",
    (C.ROUTER, False): "router",
    (C.RESID_MID, False): "resid_mid",
    (C.MLP_PRE, False): "mlp_pre",
    (C.MLP_POST, False): "mlp_post",
    (C.EXPERT_PRE, False): "expert_pre",
    (C.EXPERT_POST, False): "expert_post",
    (C.ATTENTION_PRE_NORM, False): "attention_pre_norm",
    (C.MLP_PRE_NORM, False): "mlp_pre_norm",
}

# TransformerLens names (after `blocks.{i}.`) -> (component, is_input)
TRANSFORMERLENS_BLOCK_ALIASES: dict[str, tuple[ComponentType, bool]] = {
    "hook_resid_pre": (C.RESIDUAL, True),
    "hook_resid_post": (C.RESIDUAL, False),
    "hook_attn_out": (C.ATTENTION, False),
    "hook_mlp_out": (C.MLP, False),
    "hook_mlp_in": (C.MLP, True),
    "ln1.hook_normalized": (C.LAYERNORM, False),
    "attn.hook_q": (C.QUERY, False),
    "attn.hook_k": (C.KEY, False),
    "attn.hook_v": (C.VALUE, False),
    "attn.hook_z": (C.Z, False),
    "attn.hook_attn_scores": (C.ATTENTION_SCORES, False),
    "attn.hook_pattern": (C.ATTENTION_PATTERN, False),
    "mlp.hook_router": (C.ROUTER, False),
    "hook_resid_mid": (C.RESID_MID, False),
    "mlp.hook_pre": (C.MLP_PRE, False),
    "mlp.hook_post": (C.MLP_POST, False),
    # TransformerLens 3 spellings
    "hook_in": (C.RESIDUAL, True),
    "hook_out": (C.RESIDUAL, False),
    "attn.q.hook_out": (C.QUERY, False),
    "attn.k.hook_out": (C.KEY, False),
    "attn.v.hook_out": (C.VALUE, False),
}
EMBEDDING_NAMES = {"embedding", "embed", "hook_embed", "embed_tokens", "model.embed_tokens", "transformer.wte", "wte"}
FINAL_NORM_NAMES = {"final_norm", "norm", "model.norm", "ln_final", "ln_final.hook_normalized", "transformer.ln_f", "ln_f"}
LAYER_PREFIXES = ("model.layers.", "transformer.h.", "layers.", "blocks.", "h.", "model.model.layers.")
# Module-path suffixes say which part of the block is meant. With an explicit component the
# component wins (`model.layers.5.self_attn` + `attention_pattern`); without one, the module's own
# output is meant, so `layers.2.mlp` alone is the MLP output, as in the canonical hook ids.
MODULE_SUFFIXES: dict[str, Optional[ComponentType]] = {
    "self_attn": C.ATTENTION, "attn": C.ATTENTION, "mlp": C.MLP,
    "input_layernorm": C.LAYERNORM, "ln_1": C.LAYERNORM,
    "post_attention_layernorm": None, "ln_2": None,
    "self_attn.q_proj": C.QUERY, "self_attn.k_proj": C.KEY, "self_attn.v_proj": C.VALUE,
    "self_attn.o_proj": C.ATTENTION, "attn.c_attn": None, "attn.c_proj": C.ATTENTION,
}
