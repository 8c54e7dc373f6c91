"""The audit of mlx-lm's fallback classes: per model type, what each one does not implement.

Read against mlx-lm 0.32's `mlx_lm/models/<type>.py` and transformers 5.24's modeling and
configuration files. Every check is a config key, a predicate on the normalised config
(transformers' defaults filled in, `rope_parameters` lifted), why the class gets it wrong,
and what the user can do. Checks pass for the values the class computes correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

Config = Mapping[str, Any]
Predicate = Callable[[Config], bool]

# transformers' ACT2FN names, grouped by the function they compute.
TANH_GELU = frozenset({"gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh"})
ERF_GELU = frozenset({"gelu", "gelu_python"})
SILU = frozenset({"silu", "swish"})
# Rope types mlx-lm's initialize_rope computes as transformers does (YaRN: only with its rounding, `truncate`).
INITIALIZE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

NATIVE = "run this checkpoint in transformers, or add a native mlx_engine/models/ file for this architecture."
CONFIG_REMEDY = "if config.json is wrong about the checkpoint, correct it (or pass load_model(config_overrides=...)); otherwise " + NATIVE


@dataclass(frozen=True)
class Check:
    """One feature the mlx-lm class must not be asked for; `ok` says the config does not ask."""

    feature: str
    ok: Predicate
    why: str
    remedy: str = NATIVE
    # GENERIC_CHECKS only: a ModelArgs field with one of these names means the class reads the feature.
    fields: frozenset[str] = frozenset()


def one_of(key: str, allowed: frozenset[str]) -> Predicate:
    return lambda c: c.get(key) in allowed


def equals(key: str, value: Any) -> Predicate:
    return lambda c: c.get(key) == value


def falsy(key: str) -> Predicate:
    return lambda c: not c.get(key)


def rope_type(c: Config) -> str:
    scaling = c.get("rope_scaling") or {}
    return scaling.get("rope_type") or scaling.get("type") or "default"


def rope_in(*types: str) -> Predicate:
    # mlx-lm's YaRN always rounds the correction range; transformers does only when `truncate` is true.
    return lambda c: rope_type(c) in types and (rope_type(c) != "yarn" or (c.get("rope_scaling") or {}).get("truncate", True))


def no_window(key: str = "sliding_window", gate: str = "") -> Predicate:
    """No window, one switched off (`gate` set to false), or one no shorter than the positions the model takes."""

    def ok(c: Config) -> bool:
        window = c.get(key)
        if not window or (gate and c.get(gate) is False):
            return True
        limit = c.get("max_position_embeddings")
        return limit is not None and window >= limit

    return ok


def width_is(key: str, factor: int, of: str) -> Predicate:
    return lambda c: c.get(key) in (None, factor * c.get(of, 0))


def head_dim_derived(c: Config) -> bool:
    return c.get("head_dim") in (None, c.get("hidden_size", 0) // max(c.get("num_attention_heads") or 1, 1))


def rope_per_layer_type_shared(c: Config) -> bool:
    """Per-layer-type rope parameters (transformers 5) that the class's one theta and full-layer scaling express."""
    params = c.get("rope_parameters") or {}
    per_type = {k: v for k, v in params.items() if isinstance(v, dict)}
    if not per_type:
        return True
    thetas = {v.get("rope_theta") for v in per_type.values()}
    sliding = per_type.get("sliding_attention", {})
    return len(thetas) == 1 and sliding.get("rope_type", "default") == "default"


def act(key: str, allowed: frozenset[str], what: str) -> Check:
    return Check(key, one_of(key, allowed), f"mlx-lm's class always applies {what}, whatever {key} says.")


def plain_rope(cls: str) -> Check:
    return Check("rope_scaling", rope_in("default"), f"mlx-lm's {cls} builds plain RoPE (nn.RoPE) and ignores rope scaling.", CONFIG_REMEDY)


def rope_types(cls: str, *types: str) -> Check:
    return Check(
        "rope_scaling", rope_in(*types),
        f"mlx-lm's {cls} computes only these rope types as transformers does: {', '.join(types)}.", CONFIG_REMEDY,
    )


def tied(cls: str, value: bool) -> Check:
    has = "uses the embedding as the LM head" if value else "has its own LM head tensor"
    return Check("tie_word_embeddings", equals("tie_word_embeddings", value), f"mlx-lm's {cls} always {has}.", CONFIG_REMEDY)


def ignored_window(cls: str, gate: str = "") -> Check:
    return Check(
        "sliding_window", no_window(gate=gate),
        f"mlx-lm's {cls} attends over every earlier position: it ignores the sliding window, so any sequence "
        "longer than the window is computed differently.",
    )


WHY_TANH = "the tanh-approximated GELU (nn.gelu_approx)"
WHY_ERF = "the exact erf GELU (nn.gelu); transformers' gelu_pytorch_tanh / gelu_new are the tanh form"
WHY_SILU = "SiLU-gated (SwiGLU) MLPs"

FALLBACK_RULES: dict[str, tuple[Check, ...]] = {
    "gpt_neox": (
        act("hidden_act", TANH_GELU, WHY_TANH + "; transformers' 'gelu' (GPTNeoXConfig's default) is the exact erf form"),
        Check("intermediate_size", width_is("intermediate_size", 4, "hidden_size"), "mlx-lm's GPT-NeoX MLP is always 4 * hidden_size wide."),
        Check("attention_bias", equals("attention_bias", True), "mlx-lm's GPT-NeoX always has biases on query_key_value and dense."),
        plain_rope("GPT-NeoX"),
        tied("GPT-NeoX", False),
    ),
    "stablelm": (act("hidden_act", SILU, WHY_SILU), plain_rope("StableLM"), tied("StableLM", False)),
    "phi": (
        act("hidden_act", TANH_GELU, WHY_TANH),
        Check("qk_layernorm", falsy("qk_layernorm"), "mlx-lm's Phi has no query/key layer norms."),
        plain_rope("Phi"),
        tied("Phi", False),
    ),
    "starcoder2": (
        act("hidden_act", ERF_GELU, WHY_ERF),
        ignored_window("Starcoder2"),
        Check("use_bias", equals("use_bias", True), "mlx-lm's Starcoder2 always has biases on every projection."),
        plain_rope("Starcoder2"),
    ),
    "cohere": (act("hidden_act", SILU, WHY_SILU), plain_rope("Cohere"), tied("Cohere", True)),
    "mixtral": (
        act("hidden_act", SILU, "SiLU-gated experts (SwitchGLU)"),
        ignored_window("Mixtral"),
        plain_rope("Mixtral"),
        Check("head_dim", head_dim_derived, "mlx-lm's Mixtral derives head_dim as hidden_size / num_attention_heads."),
    ),
    "gemma": (
        Check(
            "hidden_act", one_of("hidden_act", ERF_GELU - {"gelu"}),
            "mlx-lm's Gemma always applies the exact erf GELU (nn.gelu); transformers' GemmaConfig reads even the "
            "legacy 'gelu' as gelu_pytorch_tanh, the tanh form.",
        ),
        plain_rope("Gemma"),
        tied("Gemma", True),
        Check("use_bidirectional_attention", falsy("use_bidirectional_attention"), "mlx-lm's Gemma is causal only."),
    ),
    "olmo": (
        Check(
            "model_type", lambda c: False,
            "mlx-lm's 'olmo' class is for ai2-olmo (hf_olmo) checkpoints, reads their keys (d_model, n_layers), "
            "and exits the process when the ai2-olmo package is missing; transformers' OlmoForCausalLM layout has "
            "no mlx-lm implementation.",
        ),
    ),
    "ernie4_5_moe": (
        Check(
            "model_type", lambda c: False,
            "mlx-lm's Ernie 4.5 MoE drops each layer's moe_statics.e_score_correction_bias in sanitize and picks "
            "experts without it; transformers adds it to the router scores before the top-k.",
        ),
    ),
    "olmoe": (
        act("hidden_act", SILU, "SiLU-gated experts (SwitchGLU)"),
        Check("clip_qkv", lambda c: c.get("clip_qkv") is None, "mlx-lm's OLMoE never clips q, k and v."),
        rope_types("OLMoE", *INITIALIZE_ROPE_TYPES),
    ),
    "olmo3": (
        act("hidden_act", SILU, WHY_SILU),
        Check(
            "rope_parameters", rope_per_layer_type_shared,
            "mlx-lm's Olmo 3 uses one rope_theta for every layer and plain RoPE on sliding-window layers.", CONFIG_REMEDY,
        ),
        rope_types("Olmo 3", *INITIALIZE_ROPE_TYPES),
    ),
    "qwen2_moe": (
        act("hidden_act", SILU, WHY_SILU),
        ignored_window("Qwen2-MoE", gate="use_sliding_window"),
        plain_rope("Qwen2-MoE"),
        Check("decoder_sparse_step", lambda c: c.get("decoder_sparse_step", 1) == 1, "mlx-lm's Qwen2-MoE makes every layer sparse."),
        Check("mlp_only_layers", falsy("mlp_only_layers"), "mlx-lm's Qwen2-MoE has no dense-MLP layers."),
        Check("norm_topk_prob", falsy("norm_topk_prob"), "mlx-lm's Qwen2-MoE never renormalises the top-k router weights."),
    ),
    "granite": (act("hidden_act", SILU, WHY_SILU), rope_types("Granite", *INITIALIZE_ROPE_TYPES)),
    "glm4": (act("hidden_act", SILU, WHY_SILU), plain_rope("GLM-4"), tied("GLM-4", False)),
    "helium": (act("hidden_act", SILU, WHY_SILU), plain_rope("Helium")),
    "smollm3": (
        act("hidden_act", SILU, WHY_SILU),
        ignored_window("SmolLM3", gate="use_sliding_window"),
        rope_types("SmolLM3", *INITIALIZE_ROPE_TYPES),
    ),
    "gptj": (
        act("activation_function", TANH_GELU, WHY_TANH),
        Check("n_inner", width_is("n_inner", 4, "n_embd"), "mlx-lm's GPT-J MLP is always 4 * n_embd wide."),
        tied("GPT-J", False),
    ),
    "gpt_bigcode": (
        act("activation_function", ERF_GELU, WHY_ERF),
        Check("scale_attn_weights", equals("scale_attn_weights", True), "mlx-lm's GPTBigCode always scales scores by 1/sqrt(head_dim)."),
    ),
}

# For model types with no row: a feature whose key the class's ModelArgs has no field for.
GENERIC_CHECKS: tuple[Check, ...] = (
    Check(
        "rope_scaling", rope_in("default"),
        "This mlx-lm class's ModelArgs has no rope_scaling field, so it cannot apply the scaled rope the config asks for.",
        CONFIG_REMEDY, frozenset({"rope_scaling", "rope_parameters"}),
    ),
    Check(
        "sliding_window", no_window(gate="use_sliding_window"),
        "This mlx-lm class's ModelArgs has no sliding-window field, so it attends over every earlier position.",
        NATIVE, frozenset({"sliding_window", "sliding_window_pattern", "layer_types", "window_size", "use_sliding_window"}),
    ),
    Check(
        "partial_rotary_factor", lambda c: c.get("partial_rotary_factor", 1.0) in (None, 1, 1.0),
        "This mlx-lm class's ModelArgs has no partial-rotary field, so it rotates every dimension of each head.",
        NATIVE, frozenset({"partial_rotary_factor", "rotary_pct", "rotary_dim", "rope_dim", "qk_rope_head_dim"}),
    ),
)

# mlx-lm's names for keys transformers 5 writes under others: {model_type: {mlx-lm key: normalised key}}.
KEY_ALIASES: dict[str, dict[str, str]] = {
    "gpt_neox": {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"},
}
