"""Rotary position embeddings, read from either config layout.

transformers 5 writes `rope_parameters` (with `rope_theta` inside) where older
checkpoints write `rope_theta` + `rope_scaling`. mlx-lm 0.32 reads only the old keys
and silently falls back to its defaults otherwise, so every config passes through
`normalize_rope_config` before any model class sees it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope


def normalize_rope_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of `config` with `rope_theta`/`rope_scaling` filled from `rope_parameters`."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        # Absent, or keyed per layer type (Gemma 3): nothing to lift to the top level.
        return dict(config)
    config = dict(config)
    config["rope_theta"] = params["rope_theta"]
    if "partial_rotary_factor" in params and config.get("partial_rotary_factor") is None:
        # transformers 5 may keep it only here (Phi-3); every reader, mlx-lm's too, looks at the top level.
        config["partial_rotary_factor"] = params["partial_rotary_factor"]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        config["rope_scaling"] = None
    else:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        scaling["rope_type"] = rope_type
        scaling.setdefault("type", rope_type)
        config["rope_scaling"] = scaling
    return config


def lift_rope_parameters(args: Any) -> None:
    """Fill a ModelArgs' `rope_theta`/`rope_scaling` from its `rope_parameters` (transformers 5's key).

    The loader normalises every config already; this covers ModelArgs built directly.
    """
    params = getattr(args, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        lifted = normalize_rope_config({"rope_parameters": params})
        args.rope_theta = lifted["rope_theta"]
        args.rope_scaling = lifted["rope_scaling"]


class YarnRoPE(nn.Module):
    """YaRN RoPE as transformers and gpt-oss's reference compute it.

    mlx-lm's YarnRoPE always rounds the correction range to integers; the reference
    does so only when `truncate` is true (gpt-oss ships `truncate: false`), and the
    difference moves a tiny model's logits by several units after a few hundred tokens.
    """

    def __init__(
        self,
        dims: int,
        base: float,
        factor: float,
        original_max_position_embeddings: int,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: Optional[float] = None,
        mscale_all_dim: Optional[float] = None,
        attention_factor: Optional[float] = None,
        truncate: bool = True,
    ) -> None:
        super().__init__()

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)
        self.mscale = float(attention_factor)

        def correction_dim(num_rotations: float) -> float:
            return (dims * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
                2 * math.log(base)
            )

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        if low == high:
            high += 0.001  # the reference's guard against a zero-width ramp

        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        extrapolation_weight = 1.0 - ramp
        pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        inv_extrapolation = 1.0 / pos_freqs
        inv_interpolation = 1.0 / (factor * pos_freqs)
        inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
        # mx.fast.rope takes periods (1 / inverse frequency).
        self._freqs = 1.0 / inv_freq
        self.dims = dims

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.mscale != 1.0:
            # Scaling q and k by mscale is the reference's scaling of cos and sin.
            x = x * self.mscale
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


def make_rope(
    dims: int,
    base: float,
    scaling: Optional[dict[str, Any]] = None,
    max_position_embeddings: Optional[int] = None,
    traditional: bool = False,
) -> nn.Module:
    """The RoPE module a config asks for: our YaRN, mlx-lm's for every other type."""
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type == "yarn":
        return YarnRoPE(
            dims,
            base=base,
            factor=scaling["factor"],
            original_max_position_embeddings=scaling.get("original_max_position_embeddings", 4096),
            beta_fast=scaling.get("beta_fast") or 32.0,
            beta_slow=scaling.get("beta_slow") or 1.0,
            mscale=scaling.get("mscale"),
            mscale_all_dim=scaling.get("mscale_all_dim"),
            attention_factor=scaling.get("attention_factor"),
            truncate=scaling.get("truncate", True),
        )
    return initialize_rope(dims, base, traditional, scaling, max_position_embeddings)
