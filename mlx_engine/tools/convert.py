"""Quantize a checkpoint into the MLX layout (what mlx-community publishes).

An already-quantized checkpoint is refused unless asked for: re-quantizing starts from its
dequantized weights, so the second rounding adds to the first, and a direct conversion of the
float checkpoint is always closer to the original. With `requantize=True` (the CLI's
`--requantize`) it is done anyway, with a warning saying so: useful to change the bits or the
group size when the float weights are not at hand.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from mlx_lm.utils import dequantize_model, quantize_model, save_model

from ..loading import ModelLoadError, load_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)


class RequantizationWarning(UserWarning):
    """Quantizing weights that were already quantized: the rounding errors compound."""


def describe_quantization(q: Mapping[str, Any]) -> str:
    """'4-bit, group size 32, 4 layer(s) with their own settings' from a config's `quantization`."""
    overrides = sum(1 for v in q.values() if isinstance(v, Mapping))
    extra = f", {overrides} layer(s) with their own settings" if overrides else ""
    return f"{q.get('bits')}-bit, group size {q.get('group_size')}{extra}"


def already_quantized_message(src: Union[str, Path], q: Mapping[str, Any], bits: int, group_size: int) -> str:
    return (
        f"{src} is already quantized ({describe_quantization(q)}). Quantizing it again to {bits}-bit, group size "
        f"{group_size} would start from its dequantized weights, so the rounding errors of both quantizations add "
        "up. Convert the original float checkpoint instead if you have it; to re-quantize this one anyway, pass "
        "--requantize (Python: quantize_checkpoint(..., requantize=True))."
    )


def requantize_warning(src: Union[str, Path], q: Mapping[str, Any], bits: int, group_size: int) -> str:
    return (
        f"re-quantizing {src}: its {describe_quantization(q)} weights are dequantized and quantized again to "
        f"{bits}-bit, group size {group_size}. The rounding errors compound: the result is further from the original "
        "float weights than a direct conversion of the float checkpoint would be."
    )


def quantize_checkpoint(
    src: Union[str, Path], dst: Union[str, Path], bits: int = 4, group_size: int = 64, requantize: bool = False
) -> Path:
    """Load `src` with our loader, quantize it, and write an MLX checkpoint to `dst`.

    The written config keeps `rope_theta`/`rope_scaling` in the keys every reader
    understands, and `quantization` the way mlx-lm and mlx-community write it. A quantized
    `src` needs `requantize=True` (see the module docstring) and raises a RequantizationWarning.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}.")
    if group_size not in (32, 64):
        raise ValueError(f"group_size must be 32 or 64, got {group_size}.")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder.")
    kit = load_model(src)
    existing = kit.config.get("quantization")
    if existing:
        if not requantize:
            raise ModelLoadError(already_quantized_message(src, existing, bits, group_size))
        warnings.warn(requantize_warning(src, existing, bits, group_size), RequantizationWarning, stacklevel=2)
        dequantize_model(kit.model)  # back to float layers; the old settings leave the config below
    # A flat `rope_parameters` was lifted into rope_theta/rope_scaling at load; one keyed by
    # layer type (Gemma 3) has no flat spelling and must travel as it is.
    per_layer_type = isinstance(kit.config.get("rope_parameters"), dict) and "rope_theta" not in kit.config["rope_parameters"]
    dropped = ("quantization_config", "quantization") if per_layer_type else ("rope_parameters", "quantization_config", "quantization")
    config = {k: v for k, v in kit.config.items() if k not in dropped}
    model, config = quantize_model(kit.model, config, group_size=group_size, bits=bits)
    dst.mkdir(parents=True, exist_ok=True)
    save_model(dst, model)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in TOKENIZER_FILES:
        if (kit.path / name).exists():
            shutil.copy(kit.path / name, dst / name)
    return dst
