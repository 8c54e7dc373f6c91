"""Synthetic checkpoints: the exact shapes and config of a named architecture, random weights.

Benchmarks and memory tests need real-sized models (gpt-oss-20b's 201088-token vocab,
32 experts of 2880x2880) without downloading them. `synthesize` writes one to disk:

- The tensor list comes from our own model class, built lazily (MLX arrays are not
  materialised until evaluated) and, when asked, quantized with mlx-lm's own
  `quantize_model`. So names, shapes, dtypes and the `quantization` block of config.json
  are by construction what our loader (and mlx-lm's) expects, router at 8 bits included.
- Tensors are generated in chunks and streamed into safetensors shards whose headers are
  written first, so peak memory stays at a few hundred MB whatever the model's size.
- Quantized weights are drawn directly as uniformly random codes with scales and biases
  that centre them, so a dequantized weight has mean 0 and standard deviation
  1/sqrt(fan_in): activations stay finite through any number of layers.
- A byte-level BPE tokenizer sized to the vocabulary (special tokens at the ids the real
  tokenizer uses) and a chat template in the model family's shape make generation work.
"""

# One job per module: presets.py (the named configs), plan.py (tensor list and random
# bytes), writer.py (safetensors shards), tokenizer.py, build.py (`synthesize`), cli.py.
# The docstring above doubles as `mlx-engine synth --help`.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exported names and the module each lives in. They are imported on first use (PEP 562),
# not here: `mlx-engine --help` imports .cli, which imports this package first, and must
# not pay for numpy and MLX (.plan) to print a usage line.
_EXPORTS: dict[str, str] = {
    "ARCHITECTURES": "presets",
    "architecture_config": "presets",
    "TensorPlan": "plan",
    "CHUNK_ELEMENTS": "plan",
    "plan_tensors": "plan",
    "logical_parameters": "plan",
    "tensor_chunks": "plan",
    "DEFAULT_SHARD_BYTES": "writer",
    "DTYPE_BYTES": "writer",
    "FLOAT_DTYPES": "writer",
    "SafetensorsShardWriter": "writer",
    "TokenizerSpec": "tokenizer",
    "tokenizer_spec": "tokenizer",
    "write_tokenizer": "tokenizer",
    "SynthReport": "build",
    "synthesize": "build",
    "main": "cli",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .build import SynthReport, synthesize
    from .cli import main
    from .plan import CHUNK_ELEMENTS, TensorPlan, logical_parameters, plan_tensors, tensor_chunks
    from .presets import ARCHITECTURES, architecture_config
    from .tokenizer import TokenizerSpec, tokenizer_spec, write_tokenizer
    from .writer import DEFAULT_SHARD_BYTES, DTYPE_BYTES, FLOAT_DTYPES, SafetensorsShardWriter


def __getattr__(name: str) -> Any:
    """Import an exported name from its module the first time it is asked for."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    """The exported names too, imported or not, so completion and `dir()` see them."""
    return sorted({*globals(), *_EXPORTS})
