"""Quantize a checkpoint into the MLX layout (what mlx-community publishes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Union

from mlx_lm.utils import quantize_model, save_model

from ..loading import ModelLoadError, load_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "generation_config.json",
)


def quantize_checkpoint(
    src: Union[str, Path], dst: Union[str, Path], bits: int = 4, group_size: int = 64
) -> Path:
    """Load `src` with our loader, quantize it, and write an MLX checkpoint to `dst`.

    The written config keeps `rope_theta`/`rope_scaling` in the keys every reader
    understands, and `quantization` the way mlx-lm and mlx-community write it.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}.")
    if group_size not in (32, 64):
        raise ValueError(f"group_size must be 32 or 64, got {group_size}.")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder.")
    kit = load_model(src)
    if "quantization" in kit.config:
        raise ModelLoadError(f"{src} is already quantized ({kit.config['quantization']}).")
    # A flat `rope_parameters` was lifted into rope_theta/rope_scaling at load; one keyed by
    # layer type (Gemma 3) has no flat spelling and must travel as it is.
    per_layer_type = isinstance(kit.config.get("rope_parameters"), dict) and "rope_theta" not in kit.config["rope_parameters"]
    dropped = ("quantization_config",) if per_layer_type else ("rope_parameters", "quantization_config")
    config = {k: v for k, v in kit.config.items() if k not in dropped}
    model, config = quantize_model(kit.model, config, group_size=group_size, bits=bits)
    dst.mkdir(parents=True, exist_ok=True)
    save_model(dst, model)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in TOKENIZER_FILES:
        if (kit.path / name).exists():
            shutil.copy(kit.path / name, dst / name)
    return dst
