"""Module-level hook points for architectures we have no native file for.

mlx-lm's model code calls its blocks and their attention/MLP/norm submodules, and
MLX looks `__call__` up on the type, so each of those instances is given a subclass
of its own class whose `__call__` wraps the original with hook points. Parameters,
names and every other method stay as they were, so loading, quantization and tied
embeddings are untouched. Only the module-level components are offered: embedding
(the input of block 0, after any model-specific scaling), residual, attention, mlp
and layernorm, with inputs where a wrapped module has one.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Optional

import mlx.nn as nn

from ..hooks.architecture import ArchitectureInfo
from ..hooks.point import HookPoint

ATTENTION_NAMES = ("self_attn", "attention", "attn", "mixer")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
NORM_NAMES = ("input_layernorm", "ln_1", "attention_norm", "ln1", "norm1", "pre_attention_layernorm", "input_norm")
# The final norm, on the module that holds the blocks.
FINAL_NORM_NAMES = ("norm", "ln_f", "norm_f", "final_layernorm", "final_layer_norm", "final_norm", "embedding_norm")


def _first(module: nn.Module, names: tuple[str, ...]) -> Optional[tuple[str, nn.Module]]:
    for name in names:
        child = getattr(module, name, None) if name in module else None
        if isinstance(child, nn.Module):
            return name, child
    return None


def _hook_first(hook: Optional[HookPoint], name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Hook a call's first argument, positional or passed by name (GPT-J calls `block(inputs=h, ...)`)."""
    if hook is None:
        return args, kwargs
    if args:
        return (hook(args[0]),) + args[1:], kwargs
    if name in kwargs:
        return args, {**kwargs, name: hook(kwargs[name])}
    raise TypeError(f"cannot find the input ({name!r}) of a hooked call")


@lru_cache(maxsize=None)
def _hooked_class(cls: type) -> type:
    params = list(inspect.signature(cls.__call__).parameters)
    first = params[1] if len(params) > 1 else ""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _hook_first(self._hook_in, first, args, kwargs)
        out = cls.__call__(self, *args, **kwargs)
        if isinstance(out, tuple):
            return (self._hook_out(out[0]),) + out[1:]
        return self._hook_out(out)

    return type(f"Hooked{cls.__name__}", (cls,), {"__call__": __call__})


def _wrap(module: nn.Module, hook_in: Optional[HookPoint], hook_out: HookPoint) -> None:
    # Plain attributes (not arrays or modules) stay out of the parameter tree.
    object.__setattr__(module, "_hook_in", hook_in)
    object.__setattr__(module, "_hook_out", hook_out)
    module.__class__ = _hooked_class(type(module))


def _final_norm(model: nn.Module, layers: list[nn.Module]) -> Optional[nn.Module]:
    """The final norm: a FINAL_NORM_NAMES child of the module whose block list is the model's."""
    for owner in [model, *(c for c in model.children().values() if isinstance(c, nn.Module))]:
        blocks = next((owner[n] for n in ("layers", "h", "blocks") if n in owner and isinstance(owner[n], list)), None)
        if blocks and blocks[0] is layers[0]:
            found = _first(owner, FINAL_NORM_NAMES)
            if found is not None:
                return found[1]
    return None


def instrument(model: nn.Module, config: dict[str, Any]) -> tuple[ArchitectureInfo, dict[str, HookPoint]]:
    """Give every block of an mlx-lm model its hook points; return what it offers."""
    layers = list(model.layers)
    if not layers:
        raise ValueError(f"{config['model_type']} model has no `layers`; it cannot be instrumented.")
    points: dict[str, HookPoint] = {}
    offered = {"embedding", "residual"}
    for i, block in enumerate(layers):
        resid_pre = HookPoint(f"layers.{i}.resid_pre") if i else HookPoint("embedding")
        residual = HookPoint(f"layers.{i}.residual")
        _wrap(block, resid_pre, residual)
        points[resid_pre.name] = resid_pre
        points[residual.name] = residual
        if i == 0:
            # Layer 0's block input is the embedding; its residual input shares the site.
            points["layers.0.resid_pre"] = resid_pre
        for names, component, in_site, out_site in (
            (ATTENTION_NAMES, "attention", None, "attention"),
            (MLP_NAMES, "mlp", "mlp_in", "mlp"),
            (NORM_NAMES, "layernorm", None, "layernorm"),
        ):
            found = _first(block, names)
            if found is None:
                continue
            _, child = found
            hook_in = HookPoint(f"layers.{i}.{in_site}") if in_site else None
            hook_out = HookPoint(f"layers.{i}.{out_site}")
            _wrap(child, hook_in, hook_out)
            points[hook_out.name] = hook_out
            if hook_in is not None:
                points[hook_in.name] = hook_in
            offered.add(component)

    final_norm = _final_norm(model, layers)
    if final_norm is not None:
        points["final_norm"] = HookPoint("final_norm")
        _wrap(final_norm, None, points["final_norm"])

    n_heads = config.get("num_attention_heads") or config.get("n_head") or 0
    d_model = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0
    info = ArchitectureInfo(
        model_type=config["model_type"],
        num_layers=len(layers),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or (d_model // n_heads if n_heads else 0),
        vocab_size=config.get("vocab_size", 0),
        sliding_window=config.get("sliding_window"),
        block_prefix="model.layers",
        offered=tuple(c for c in ("embedding", "residual", "attention", "mlp", "layernorm") if c in offered),
        final_norm=final_norm is not None,
    )
    return info, points
