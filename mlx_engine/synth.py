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

from __future__ import annotations

import argparse
import copy
import json
import math
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

DEFAULT_SHARD_BYTES = 2 * 1024**3
CHUNK_ELEMENTS = 8 * 1024 * 1024
TRAINED_VOCAB = 2048

YARN_GPT_OSS = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "rope_type": "yarn",
    "truncate": False,
}
LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def _gpt_oss(layers: int, experts: int, **extra: Any) -> dict[str, Any]:
    config = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "experts_per_token": 4,
        "num_experts_per_tok": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "intermediate_size": 2880,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "num_local_experts": experts,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(YARN_GPT_OSS),
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 201088,
        "use_cache": True,
    }
    config.update(extra)
    config["layer_types"] = [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config["num_hidden_layers"])
    ]
    return config


def _llama(**fields: Any) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "mlp_bias": False,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    config.update(fields)
    return config


# The published configs (openai/gpt-oss-*, meta-llama/Llama-3.*), plus two smaller
# shapes for benchmarks: a GPT-3-Small-sized Llama and a gpt-oss-shaped MoE under 1B.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": _gpt_oss(24, 32),
    "gpt-oss-120b": _gpt_oss(36, 128),
    "gpt-oss-moe-1b": _gpt_oss(
        12,
        32,
        hidden_size=768,
        intermediate_size=512,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "llama-1b": _llama(
        bos_token_id=128000,
        eos_token_id=128001,
        head_dim=64,
        hidden_size=2048,
        intermediate_size=8192,
        max_position_embeddings=131072,
        num_attention_heads=32,
        num_hidden_layers=16,
        num_key_value_heads=8,
        rope_scaling=dict(LLAMA3_ROPE),
        rope_theta=500000.0,
        tie_word_embeddings=True,
        vocab_size=128256,
    ),
    "llama-8b": _llama(
        bos_token_id=128000,
        eos_token_id=128001,
        head_dim=128,
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=131072,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
        rope_theta=500000.0,
        tie_word_embeddings=False,
        vocab_size=128256,
    ),
    "llama-125m": _llama(
        bos_token_id=1,
        eos_token_id=2,
        head_dim=64,
        hidden_size=768,
        intermediate_size=2048,
        max_position_embeddings=2048,
        num_attention_heads=12,
        num_hidden_layers=12,
        num_key_value_heads=12,
        rope_scaling=None,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        vocab_size=32000,
    ),
}

HARMONY_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}<|end|>"
    "{% else %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Special tokens at the ids the real tokenizer gives them, and what they are for."""

    specials: dict[int, str]
    bos: Optional[str]
    eos: str
    pad: Optional[str]
    chat_template: str
    generation_eos: tuple[int, ...]


def tokenizer_spec(config: dict[str, Any]) -> TokenizerSpec:
    vocab = config["vocab_size"]
    if config["model_type"] == "gpt_oss":
        named = {
            199998: "<|startoftext|>",
            199999: "<|endoftext|>",
            200002: "<|return|>",
            200003: "<|constrain|>",
            200005: "<|channel|>",
            200006: "<|start|>",
            200007: "<|end|>",
            200008: "<|message|>",
            200012: "<|call|>",
        }
        first = min(named)
        specials = {i: named.get(i, f"<|reserved_{i}|>") for i in range(first, vocab)}
        return TokenizerSpec(specials, "<|startoftext|>", "<|return|>", "<|endoftext|>", HARMONY_TEMPLATE, (200002, 199999, 200012))
    if vocab > 128000:
        named = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
        specials = {i: named.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, vocab)}
        return TokenizerSpec(specials, "<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3_TEMPLATE, (128001, 128008, 128009))
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    return TokenizerSpec(specials, "<s>", "</s>", None, LLAMA2_TEMPLATE, (2,))


def architecture_config(
    like: str, layers: Optional[int] = None, overrides: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    """The named architecture's config.json (old `rope_theta`/`rope_scaling` keys, which
    every reader understands), with `layers` and dotted-key `overrides` applied."""
    if like not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {like!r}; known: {', '.join(sorted(ARCHITECTURES))}.")
    config = copy.deepcopy(ARCHITECTURES[like])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be at least 1, got {layers}.")
        config["num_hidden_layers"] = layers
        if "layer_types" in config:
            config["layer_types"] = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
            ]
    for key, value in (overrides or {}).items():
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return config


# ---------------------------------------------------------------- tensor plan


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


DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
FLOAT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def plan_tensors(
    config: dict[str, Any], dtype: str, bits: Optional[int], group_size: int
) -> tuple[list[TensorPlan], dict[str, Any]]:
    """Every tensor the model class holds (quantized if asked) and the config to write.

    The model is built lazily, so nothing of its size is ever allocated; only names,
    shapes and dtypes are read off it.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .model_kit import model_classes
    from .models.rope import normalize_rope_config

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


# ---------------------------------------------------------------- streaming writer


def _to_dtype(values: np.ndarray, code: str) -> np.ndarray:
    """float32 values as the bytes of `code` (bfloat16 rounded to nearest even)."""
    if code == "F32":
        return values.astype(np.float32)
    if code == "F16":
        return values.astype(np.float16)
    bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def tensor_chunks(plan: TensorPlan, seed: int) -> Iterator[bytes]:
    """The tensor's bytes in chunks of at most CHUNK_ELEMENTS elements."""
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


class SafetensorsShardWriter:
    """Writes tensors into safetensors shards whose headers are known before any data.

    Each shard's header (names, dtypes, shapes, offsets) is written first; tensors then
    arrive in header order as byte chunks, so no tensor is ever whole in memory.
    """

    def __init__(self, out_dir: Path, entries: list[tuple[str, str, tuple[int, ...]]], shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = math.prod(entry[2]) * DTYPE_BYTES[entry[1]]
            if self.shards[-1] and size + nbytes > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(entry)
            size += nbytes
        n = len(self.shards)
        self.names = [
            "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self.total_bytes = 0

    def write(self, chunks_for: Callable[[str], Iterator[bytes]]) -> dict[str, str]:
        """Write every shard; returns the weight map (tensor name -> shard file)."""
        weight_map = {}
        for fname, shard in zip(self.names, self.shards):
            header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
            offset = 0
            for name, dtype, shape in shard:
                nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            with open(self.out_dir / fname, "wb") as fh:
                fh.write(struct.pack("<Q", len(blob)))
                fh.write(blob)
                for name, dtype, shape in shard:
                    expected = math.prod(shape) * DTYPE_BYTES[dtype]
                    written = 0
                    for chunk in chunks_for(name):
                        fh.write(chunk)
                        written += len(chunk)
                    if written != expected:
                        raise RuntimeError(f"{name}: wrote {written} bytes, expected {expected}.")
                    weight_map[name] = fname
            self.total_bytes += offset
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return weight_map


# ---------------------------------------------------------------- tokenizer


def _training_text() -> str:
    """Deterministic English-and-code text to learn a few thousand merges from."""
    import inspect
    import json.decoder
    import json.encoder

    return "\n".join(inspect.getsource(m) for m in (json, json.decoder, json.encoder, argparse))


def write_tokenizer(out_dir: Path, config: dict[str, Any], model_max_length: int = 131072) -> int:
    """A byte-level BPE with exactly `vocab_size` ids; returns how many ids it names.

    A few thousand merges are learned from text so prompts tokenize like prose; every
    remaining id gets a distinct byte string (reachable by id, never by merges), so any
    id a random model emits decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = tokenizer_spec(config)
    vocab_size = config["vocab_size"]
    regular_ids = [i for i in range(vocab_size) if i not in spec.specials]

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(TRAINED_VOCAB, len(regular_ids)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator([_training_text()], trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    trained = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokens = [t for t, _ in trained]
    taken = set(tokens)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    length = 2
    while len(tokens) < len(regular_ids):
        for combo in _combinations(alphabet, length):
            if combo not in taken:
                tokens.append(combo)
                taken.add(combo)
                if len(tokens) == len(regular_ids):
                    break
        length += 1
    vocab = {tok: i for tok, i in zip(tokens, regular_ids)}
    vocab.update({text: i for i, text in spec.specials.items()})

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(spec.specials.items())])
    tok.save(str(out_dir / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": spec.chat_template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation = {"eos_token_id": list(spec.generation_eos), "do_sample": False}
    if spec.bos is not None:
        generation["bos_token_id"] = next(i for i, t in spec.specials.items() if t == spec.bos)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return len(vocab)


def _combinations(alphabet: list[str], length: int) -> Iterator[str]:
    if length == 1:
        yield from alphabet
        return
    for head in alphabet:
        for tail in _combinations(alphabet, length - 1):
            yield head + tail


# ---------------------------------------------------------------- entry points


@dataclass
class SynthReport:
    """What was written: where, how many parameters (logical) and bytes."""

    path: Path
    like: str
    config: dict[str, Any]
    parameters: int
    bytes_written: int
    shards: int

    def summary(self) -> str:
        q = self.config.get("quantization")
        how = f"{q['bits']}-bit (group size {q['group_size']})" if q else self.config["torch_dtype"]
        return (
            f"Wrote a synthetic {self.like} ({self.config['num_hidden_layers']} layers, "
            f"{self.parameters / 1e9:.3f}B parameters, {how}) to {self.path}: "
            f"{self.bytes_written / 2**30:.2f} GiB in {self.shards} shard(s)."
        )


def logical_parameters(plans: list[TensorPlan]) -> int:
    """Parameters counted as the unquantized model would have them."""
    total = 0
    for p in plans:
        if p.fill == "codes":
            total += math.prod(p.shape) * 32 // p.bits
        elif p.fill not in ("scale", "offset"):
            total += math.prod(p.shape)
    return total


def synthesize(
    like: str,
    out: Union[str, Path],
    *,
    bits: Optional[int] = None,
    group_size: int = 64,
    layers: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    overrides: Optional[dict[str, Any]] = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
) -> SynthReport:
    """Write a random-weight checkpoint of architecture `like` to `out`, streaming."""
    if bits is not None and bits not in (2, 3, 4, 6, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 6, 8; got {bits}.")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size}.")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder or pass force.")
    config = architecture_config(like, layers, overrides)
    dtype = dtype or config.get("torch_dtype", "bfloat16")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}; got {dtype!r}.")
    plans, config = plan_tensors(config, dtype, bits, group_size)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    by_name = {p.name: p for p in plans}
    writer = SafetensorsShardWriter(out, [(p.name, p.dtype, p.shape) for p in plans], shard_bytes)
    writer.write(lambda name: tensor_chunks(by_name[name], seed))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    write_tokenizer(out, config)
    return SynthReport(out, like, config, logical_parameters(plans), writer.total_bytes, len(writer.names))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE (VALUE as JSON), got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _cmd_synth(args: argparse.Namespace) -> int:
    report = synthesize(
        args.like,
        args.out,
        bits=args.bits,
        group_size=args.group_size,
        layers=args.layers,
        dtype=args.dtype,
        seed=args.seed,
        overrides=dict(args.set or []),
        shard_bytes=int(args.shard_gb * 2**30),
        force=args.force,
    )
    print(report.summary())
    return 0


def add_synth_command(subparsers: argparse._SubParsersAction) -> None:
    """`mlx-engine synth --like NAME --out DIR [--bits 4 --group-size 32] [--layers N]`."""
    p = subparsers.add_parser(
        "synth",
        help="write a random-weight checkpoint with a named architecture's exact shapes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--like", required=True, choices=sorted(ARCHITECTURES))
    p.add_argument("--out", required=True, help="folder to write (must be new or empty unless --force)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 6, 8), default=None, help="quantize (MLX affine layout)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), default=None, help="float dtype (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30, help="max GiB per shard")
    p.add_argument("--set", type=_parse_override, action="append", metavar="KEY=JSON",
                   help="override a config key, dotted for nested keys (rope_scaling.truncate=true)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=_cmd_synth)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_synth_command(sub)
    args = parser.parse_args(["synth", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
