"""The benchmark's models: synthetic checkpoints, and the same weights for transformers.

Every contender reads the same weights. mlx-lm reads the MLX folder directly (the
config uses the old `rope_theta`/`rope_scaling` keys, and YaRN's `truncate` is true
because mlx-lm always truncates the YaRN correction range: with `false` it would run
a slightly different RoPE than ours). transformers cannot read MLX's quantized layout,
so it gets an exported float32 folder holding exactly the values the quantized weights
stand for (dequantized), in its own tensor layout.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from mlx_engine.tools import synth

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: which architecture, which precision, any config overrides."""

    key: str
    like: str
    dtype: str
    bits: Optional[int] = None
    group_size: int = 64
    layers: Optional[int] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # Per-model trial size, where the full run's default would take too long on a CPU.
    prompt_tokens: Optional[int] = None
    decode_tokens: Optional[int] = None

    @property
    def label(self) -> str:
        precision = f"{self.bits}-bit (group {self.group_size}, {self.dtype} scales)" if self.bits else self.dtype
        layers = f", {self.layers} layers" if self.layers else ""
        return f"{self.like}{layers}, {precision}"

    def synth_command(self, out: Path) -> str:
        parts = ["mlx-engine synth", f"--like {self.like}", f"--out {out}", f"--dtype {self.dtype}"]
        if self.bits:
            parts += [f"--bits {self.bits}", f"--group-size {self.group_size}"]
        if self.layers:
            parts.append(f"--layers {self.layers}")
        parts += [f"--set {k}={json.dumps(v, separators=(',', ':'))}" for k, v in self.overrides.items()]
        return " ".join(parts)


YARN_AS_MLX_LM = {"rope_scaling.truncate": True}
QUICK_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 4096,
}

# Quantized models use float32 scales and activations: MLX's CPU quantized kernels run
# several times faster with float32 than with bfloat16 scales, and far faster than with
# float16 ones (the kernel table in RESULTS.md measures all three), so half-precision
# scales would make a 4-bit decode benchmark take hours on a small CPU.
FULL_MODELS = (
    ModelSpec("llama-125m-f16", "llama-125m", "float16", prompt_tokens=32, decode_tokens=16),
    ModelSpec("llama-125m-f32", "llama-125m", "float32", prompt_tokens=32, decode_tokens=16),
    ModelSpec("llama-125m-q4-f32", "llama-125m", "float32", bits=4, prompt_tokens=32, decode_tokens=16),
    ModelSpec("gpt-oss-moe-1b-q4-f32", "gpt-oss-moe-1b", "float32", bits=4, overrides=YARN_AS_MLX_LM,
              prompt_tokens=16, decode_tokens=12),
)
QUICK_MODELS = (ModelSpec("quick-llama-f32", "llama-125m", "float32", layers=2, overrides=QUICK_SHAPE),)
# The published config as is (YaRN truncate false): only our engine loads this one.
GPT_OSS_20B = ModelSpec("gpt-oss-20b-q4-f32", "gpt-oss-20b", "float32", bits=4, group_size=64)


def ensure_synth(spec: ModelSpec, root: Path) -> Path:
    """The spec's MLX folder under `root`, written unless an identical one is there."""
    out = root / spec.key
    stamp = out / "synth-spec.json"
    wanted = json.dumps(spec.__dict__, sort_keys=True, default=str)
    if stamp.exists() and stamp.read_text() == wanted:
        return out
    if out.exists():
        shutil.rmtree(out)
    synth.synthesize(
        spec.like, out, bits=spec.bits, group_size=spec.group_size, layers=spec.layers, dtype=spec.dtype,
        overrides=spec.overrides,
    )
    stamp.write_text(wanted)
    return out


def _transformers_config(config: dict[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    scaling = config.get("rope_scaling")
    params = {"rope_theta": config["rope_theta"], "rope_type": "default"}
    if scaling:
        params.update(scaling)
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    config["rope_parameters"] = params
    config["torch_dtype"] = config["dtype"] = "float32"
    return config


def _float_tensors(mlx_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of an MLX folder as float32 numpy, quantized ones dequantized."""
    import mlx.core as mx

    config = json.loads((mlx_dir / "config.json").read_text())
    quant = config.get("quantization") or {}
    for f in sorted(mlx_dir.glob("model*.safetensors")):
        weights = mx.load(str(f))
        for name in sorted(weights):
            if name.endswith((".scales", ".biases")):
                continue
            module = name.rsplit(".", 1)[0]
            array = weights[name]
            if name.endswith(".weight") and f"{module}.scales" in weights:
                params = quant.get(module) if isinstance(quant.get(module), dict) else quant
                array = mx.dequantize(
                    array, weights[f"{module}.scales"], weights[f"{module}.biases"],
                    group_size=params["group_size"], bits=params["bits"],
                )
            yield name, np.array(array.astype(mx.float32))
        del weights


def _to_transformers_layout(name: str, value: np.ndarray, pending: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """Our (mlx-lm's) split expert tensors as transformers' fused, interleaved ones."""
    if ".mlp.experts." not in name:
        yield name, value
        return
    base, rest = name.split(".mlp.experts.")
    prefix = f"{base}.mlp.experts"
    if rest == "down_proj.weight":
        yield f"{prefix}.down_proj", np.ascontiguousarray(value.swapaxes(-1, -2))
    elif rest == "down_proj.bias":
        yield f"{prefix}.down_proj_bias", value
    else:
        pending[f"{prefix}/{rest}"] = value
        for kind, out_name in (("weight", "gate_up_proj"), ("bias", "gate_up_proj_bias")):
            gate, up = pending.get(f"{prefix}/gate_proj.{kind}"), pending.get(f"{prefix}/up_proj.{kind}")
            if gate is None or up is None:
                continue
            if kind == "weight":  # [E, I, H] each -> [E, H, 2I], gate at even columns
                gate, up = gate.swapaxes(-1, -2), up.swapaxes(-1, -2)
            fused = np.empty(gate.shape[:-1] + (2 * gate.shape[-1],), dtype=np.float32)
            fused[..., ::2], fused[..., 1::2] = gate, up
            del pending[f"{prefix}/gate_proj.{kind}"], pending[f"{prefix}/up_proj.{kind}"]
            yield f"{prefix}.{out_name}", fused


def export_for_transformers(mlx_dir: Path, out: Path) -> Path:
    """A float32 transformers folder with the values of `mlx_dir`'s weights."""
    stamp = out / "exported-from.json"
    source = json.dumps({"from": str(mlx_dir), "config": (mlx_dir / "config.json").read_text()})
    if stamp.exists() and stamp.read_text() == source:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = json.loads((mlx_dir / "config.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    pending: dict[str, np.ndarray] = {}
    from safetensors.numpy import save_file

    shard, shard_bytes, index = 0, 0, {}

    def flush() -> None:
        nonlocal shard, shard_bytes, tensors
        if not tensors:
            return
        shard += 1
        fname = f"model-{shard:05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        index.update({k: fname for k in tensors})
        tensors, shard_bytes = {}, 0

    for name, value in _float_tensors(mlx_dir):
        for out_name, out_value in _to_transformers_layout(name, value, pending):
            tensors[out_name] = out_value
            shard_bytes += out_value.nbytes
            if shard_bytes > 2**30:
                flush()
    flush()
    if pending:
        raise RuntimeError(f"unpaired expert tensors: {sorted(pending)}")
    total = sum((out / f).stat().st_size for f in set(index.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    (out / "config.json").write_text(json.dumps(_transformers_config(config), indent=2))
    for fname in TOKENIZER_FILES:
        if (mlx_dir / fname).exists():
            shutil.copy(mlx_dir / fname, out / fname)
    stamp.write_text(source)
    return out
