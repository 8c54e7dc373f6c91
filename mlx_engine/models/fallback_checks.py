"""What an mlx-lm class is given, and what it is refused, when a model type has no native file.

mlx-lm's ModelArgs read the keys of older configs and ignore the rest, and several of
its classes hard-code what transformers reads from the config (the activation, the
rotary embedding, a sliding window). Loaded as they are, such checkpoints produce other
numbers than transformers with no error. So every fallback config is first normalised
(`normalize_fallback_config`): transformers' own config class fills its defaults and
converts legacy keys, and transformers 5's `rope_parameters` is lifted to the keys
mlx-lm reads. Then `check_fallback_config` refuses, naming the feature and what to do,
any config that uses a feature the mlx-lm class does not implement.

`FALLBACK_RULES` is the audit of mlx-lm 0.32's model files against transformers 5.24:
one row per model type, each check saying which config key, why it matters, and what to
do. Model types without a row get only `GENERIC_CHECKS`, which refuse a feature whose key
the mlx-lm ModelArgs has no field for (so its class cannot be reading it).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

from .fallback_rules import FALLBACK_RULES, GENERIC_CHECKS, KEY_ALIASES, Check

__all__ = ["FALLBACK_RULES", "FallbackRefused", "check_fallback_config", "check_model_args", "normalize_fallback_config"]


class FallbackRefused(ValueError):
    """A checkpoint whose config asks for something the mlx-lm class would silently not do."""


def _transformers_view(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The config as transformers' own class for the model type reads it (defaults filled), or None."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    mapping = transformers.CONFIG_MAPPING
    if config["model_type"] not in mapping:
        return None  # an mlx-lm-only architecture: no transformers reference to agree with
    raw = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling") or "rope_parameters" not in config}
    try:
        return mapping[config["model_type"]].from_dict(raw).to_dict()
    except (ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as exc:
        raise FallbackRefused(
            f"transformers' {config['model_type']} configuration class rejects this config.json ({exc}); "
            "fix config.json so that transformers itself can load it."
        ) from exc


def _lift_rope(config: dict[str, Any]) -> None:
    """transformers 5's rope_parameters -> rope_theta, rope_scaling and partial_rotary_factor."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return
    if "rope_theta" not in params:
        # Keyed by layer type (Olmo 3, Cohere 2): mlx-lm classes read one set, the full-attention one.
        per_type = {k: v for k, v in params.items() if isinstance(v, dict)}
        params = per_type.get("full_attention") or next(iter(per_type.values()), None)
        if not isinstance(params, dict) or "rope_theta" not in params:
            return
    config["rope_theta"] = params["rope_theta"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        config["rope_scaling"] = None
    else:
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        scaling["rope_type"] = rope_type
        scaling.setdefault("type", rope_type)
        config["rope_scaling"] = scaling
    if "partial_rotary_factor" in params:
        config["partial_rotary_factor"] = params["partial_rotary_factor"]


def normalize_fallback_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` in the keys mlx-lm's classes read, with transformers' defaults filled in."""
    view = _transformers_view(config)
    # transformers' values win: its defaults, its conversions of legacy keys, and its rewrites
    # (GemmaConfig turns hidden_act "gelu" into "gelu_pytorch_tanh") are what it computes with.
    out = {**config, **view} if view is not None else dict(config)
    _lift_rope(out)
    for target, source in KEY_ALIASES.get(out["model_type"], {}).items():
        if source in out:
            out[target] = out[source]
    return out


def _refusal(model_type: str, check: Check, config: Mapping[str, Any]) -> str:
    value = config.get(check.feature, "<absent>")
    return (
        f"{model_type} has no native mlx-engine implementation, and mlx-lm's class for it does not implement "
        f"what this config.json asks for: {check.feature} = {value!r}. {check.why} Its outputs would differ "
        f"from transformers', so the checkpoint is refused. What to do: {check.remedy}"
    )


def check_fallback_config(config: Mapping[str, Any], args_class: Optional[type] = None) -> None:
    """Raise FallbackRefused for the first feature of a normalised config the mlx-lm class would not honour."""
    model_type = config["model_type"]
    fields = {f.name for f in dataclasses.fields(args_class)} if args_class is not None else None
    for check in FALLBACK_RULES.get(model_type, ()):
        if not check.ok(config):
            raise FallbackRefused(_refusal(model_type, check, config))
    if model_type in FALLBACK_RULES or fields is None:
        return
    for check in GENERIC_CHECKS:
        if not (check.fields & fields) and not check.ok(config):
            raise FallbackRefused(_refusal(model_type, check, config))


_MISSING = re.compile(r"missing \d+ required (?:positional|keyword-only) arguments?: (.+)$")


def check_model_args(args_class: type, config: Mapping[str, Any]) -> None:
    """Build mlx-lm's ModelArgs once, so a missing key is named rather than a TypeError mid-load."""
    try:
        args_class.from_dict(dict(config))
    except (TypeError, ValueError, KeyError) as exc:
        match = _MISSING.search(str(exc)) if isinstance(exc, TypeError) else None
        names = re.findall(r"'([^']+)'", match.group(1)) if match else []
        what = f"has no {', '.join(names)}" if names else f"does not fit it ({exc})"
        raise FallbackRefused(
            f"config.json for {config['model_type']} (loaded through mlx-lm's {args_class.__module__}.ModelArgs) "
            f"{what}: that class reads keys transformers' configuration does not write (often the checkpoint's "
            "original key names). Add them to config.json with the values the checkpoint was trained with, or run "
            "the checkpoint in transformers."
        ) from exc


def head_check(config: Mapping[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A check of the loaded weights: a tied config must not drop a stored head transformers would use."""

    def check(weights: dict[str, Any]) -> None:
        import mlx.core as mx

        if not config.get("tie_word_embeddings"):
            return
        head = weights.get("lm_head.weight")
        embeds = [k for k in weights if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
        if head is None or len(embeds) != 1:
            return
        embed = weights[embeds[0]]
        if head.shape != embed.shape or not mx.array_equal(head, embed).item():
            raise FallbackRefused(
                f"The checkpoint's lm_head.weight differs from {embeds[0]}, but config.json sets "
                "tie_word_embeddings to true. transformers then keeps the stored head and uses it, while mlx-lm "
                'would drop it; set "tie_word_embeddings": false in config.json to load that head.'
            )

    return check

