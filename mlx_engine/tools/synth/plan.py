"""What to write: the tensor list of a model, and the random bytes that fill each tensor.

The tensor list comes from our own model class, built lazily (MLX arrays are not
materialised until evaluated) and, when asked, quantized with mlx-lm's own
`quantize_model`. So names, shapes, dtypes and the `quantization` block of config.json
are by construction what our loader (and mlx-lm's) expects, router at 8 bits included.

Quantized weights are drawn directly as uniformly random codes with scales and biases
that centre them, so a dequantized weight has mean 0 and standard deviation
1/sqrt(fan_in): activations stay finite through any number of layers.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from .writer import DTYPE_BYTES, FLOAT_DTYPES

CHUNK_ELEMENTS = 8 * 1024 * 1024
"""Elements generated at a time: 32 MB as float32, which bounds synth's peak memory."""


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its name, safetensors dtype, shape, and how to fill it."""

    name: str
    dtype: str  # "BF16", "F16", "F32", "U32"
    shape: tuple[int, ...]
    fill: str  # "normal", "ones", "codes", "scale", "offset"
    std: float = 0.0
    bits: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def plan_tensors(
    config: dict[str, Any], dtype: str, bits: Optional[int], group_size: int
) -> tuple[list[TensorPlan], dict[str, Any]]:
    """Every tensor the model class holds (quantized if asked) and the config to write.

    The model is built lazily, so nothing of its size is ever allocated; only names,
    shapes and dtypes are read off it.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ...loading import model_classes
    from ...models.rope import normalize_rope_config

    model_cls, args_cls = model_classes(config)
    model = model_cls(args_cls.from_dict(normalize_rope_config(config)))
    model.set_dtype(getattr(mx, dtype))
    config = dict(config)
    quant: dict[str, Any] = {}
    if bits is not None:
        from mlx_lm.utils import quantize_model

        predicate = getattr(model, "quant_predicate", None)
        model, quantized = quantize_model(model, {}, group_size=group_size, bits=bits, quant_predicate=predicate)
        quant = quantized["quantization"]
        config["quantization"] = quant
        config["quantization_config"] = quant
    float_code = FLOAT_DTYPES[dtype]
    params = dict(tree_flatten(model.parameters()))

    def module_bits(module: str) -> int:
        # mlx-lm records per-module exceptions (the 8-bit router) as nested dicts.
        override = quant.get(module)
        return override["bits"] if isinstance(override, dict) else int(bits or 0)

    plans = []
    for name, array in params.items():
        shape = tuple(array.shape)
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and array.dtype == mx.uint32:
            b = module_bits(module)
            in_features = shape[-1] * 32 // b
            plans.append(TensorPlan(name, "U32", shape, "codes", std=1.0 / math.sqrt(in_features), bits=b))
        elif f"{module}.weight" in params and params[f"{module}.weight"].dtype == mx.uint32 and name.endswith((".scales", ".biases")):
            weight_shape = params[f"{module}.weight"].shape
            b = module_bits(module)
            in_features = weight_shape[-1] * 32 // b
            fill = "scale" if name.endswith(".scales") else "offset"
            plans.append(TensorPlan(name, float_code, shape, fill, std=1.0 / math.sqrt(in_features), bits=b))
        elif name.endswith(".weight") and len(shape) == 1:
            plans.append(TensorPlan(name, float_code, shape, "ones"))
        elif name.endswith(".weight"):
            plans.append(TensorPlan(name, float_code, shape, "normal", std=1.0 / math.sqrt(shape[-1])))
        elif name.endswith(".sinks"):
            plans.append(TensorPlan(name, float_code, shape, "normal", std=0.5))
        else:  # biases of linear layers
            plans.append(TensorPlan(name, float_code, shape, "normal", std=0.02))
    config["torch_dtype"] = dtype
    return plans, config


def logical_parameters(plans: list[TensorPlan]) -> int:
    """Parameters counted as the unquantized model would have them."""
    total = 0
    for p in plans:
        if p.fill == "codes":
            total += math.prod(p.shape) * 32 // p.bits
        elif p.fill not in ("scale", "offset"):
            total += math.prod(p.shape)
    return total


def _to_dtype(values: np.ndarray, code: str) -> np.ndarray:
    """float32 values as the bytes of `code` (bfloat16 rounded to nearest even).

    numpy has no bfloat16, so it is done by hand on the float32 bit pattern.
    """
    if code == "F32":
        return values.astype(np.float32)
    if code == "F16":
        return values.astype(np.float16)
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def tensor_chunks(plan: TensorPlan, seed: int) -> Iterator[bytes]:
    """The tensor's bytes in chunks of at most CHUNK_ELEMENTS elements.

    Each tensor has its own generator, seeded by `seed` and its name, so its values do
    not depend on which tensors come before it or on how they are sharded.
    """
    rng = np.random.default_rng([seed, zlib.crc32(plan.name.encode())])
    total = math.prod(plan.shape)
    levels = (1 << plan.bits) - 1 if plan.bits else 0
    # A uniform code in [0, levels] has variance ((levels + 1)^2 - 1) / 12.
    scale = plan.std / math.sqrt(((levels + 1) ** 2 - 1) / 12) if levels else 0.0
    for start in range(0, total, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, total - start)
        if plan.fill == "codes":
            yield rng.bytes(4 * n)
        elif plan.fill == "scale":
            yield _to_dtype(np.full(n, scale, dtype=np.float32), plan.dtype).tobytes()
        elif plan.fill == "offset":
            yield _to_dtype(np.full(n, -scale * levels / 2, dtype=np.float32), plan.dtype).tobytes()
        elif plan.fill == "ones":
            yield _to_dtype(np.ones(n, dtype=np.float32), plan.dtype).tobytes()
        else:
            values = rng.standard_normal(n, dtype=np.float32)
            values *= plan.std
            yield _to_dtype(values, plan.dtype).tobytes()
