"""Native instrumented architectures, picked by config.json's `model_type`.

Each module defines `ModelArgs` and `Model` in the style of mlx-lm's model files, plus
the hook wiring described in `base.py`. Anything else mlx-lm can load goes through
`generic.py`, which offers the module-level components only.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

# model_type -> module in this package
NATIVE_ARCHITECTURES: dict[str, str] = {
    "gpt_oss": "gpt_oss",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "gemma3_text": "gemma3",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "olmo2": "olmo2",
}


def native_module(model_type: str) -> Optional[ModuleType]:
    name = NATIVE_ARCHITECTURES.get(model_type)
    if name is None:
        return None
    return importlib.import_module(f"{__name__}.{name}")
