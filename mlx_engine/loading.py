"""Load a checkpoint (local folder or Hugging Face repo id) into a ModelKit.

The model class is ours when we have a native instrumented file for the config's
`model_type`, and mlx-lm's otherwise. Every config is normalised first
(`rope_parameters` -> `rope_theta`/`rope_scaling`), so no class ever falls back
silently to default RoPE settings. A config for an mlx-lm class is normalised further
(transformers' defaults, the keys that class reads) and checked against what the class
implements (models/fallback_checks.py): a feature it would silently not compute is a
ModelLoadError, never other numbers. mlx-lm's `load_model` does the weight plumbing
(sanitize, quantized layers for MLX conversions and MXFP4, strict loading) with our
class lookup plugged in.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .hooks.architecture import ArchitectureInfo
from .hooks.point import HookPoint
from .models import NATIVE_ARCHITECTURES, native_module
from .models.fallback_checks import (
    FallbackRefused,
    check_fallback_config,
    check_model_args,
    head_check,
    normalize_fallback_config,
)
from .models.rope import normalize_rope_config

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
HARMONY_MARKERS = ("<|channel|>", "<|message|>", "<|start|>")


class ModelLoadError(ValueError):
    """A checkpoint could not be found or read; the message says what was tried."""


@dataclass
class ModelKit:
    """A loaded model with everything needed to prompt it and read its insides."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict[str, Any]
    path: Path
    model_id: str
    native: bool
    arch_info: ArchitectureInfo
    hook_points: dict[str, HookPoint] = field(default_factory=dict)
    # What load_model(config_overrides=...) changed from config.json (empty for a faithful load).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # load_model(cpu_dequantize=True): what was converted and the memory it cost (None otherwise).
    dequantized: Optional[str] = None

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @cached_property
    def activation_itemsize(self) -> int:
        """Bytes per captured element: the model's float dtype (quantized models: their scales')."""
        from mlx.utils import tree_flatten

        for _, v in tree_flatten(self.model.parameters()):
            if v.dtype in (mx.float32, mx.float16, mx.bfloat16):
                return v.dtype.size
        return 4

    def resolve_hooks(self, specs: Any) -> list[Any]:
        """Hook requests resolved against this model (see hooks/names.py); raises HookSpecError."""
        from .hooks.names import resolve_hooks

        return resolve_hooks(self.arch_info, self.native, specs)

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    @property
    def is_harmony(self) -> bool:
        """Whether the chat format is gpt-oss's Harmony (channels in the output)."""
        vocab = self.tokenizer.get_vocab()
        return all(marker in vocab for marker in HARMONY_MARKERS)


def resolve_model_path(path_or_repo_id: Union[str, Path], revision: Optional[str] = None) -> tuple[Path, str]:
    """The local folder for a name: "default", an existing folder, or a Hub repo id."""
    name = str(path_or_repo_id)
    if name == DEFAULT_MODEL_NAME:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(f"The embedded default model is missing from {DEFAULT_MODEL_DIR}.")
        return DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{local} is a file; a model is a folder with config.json and *.safetensors.")
        if not (local / "config.json").exists():
            raise ModelLoadError(f"{local} has no config.json, so it is not a model checkpoint folder.")
        return local.resolve(), local.name
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"Model {name!r} not found: no local folder at {local.resolve()}, and it is not a "
            "Hugging Face repo id of the form 'owner/name'."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=HUB_FILE_PATTERNS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        how = "offline mode is on and it is not in the local Hub cache" if offline else f"download failed: {exc}"
        raise ModelLoadError(
            f"Model {name!r} not found: no local folder at {local.resolve()}, and as a Hugging Face "
            f"repo id {how}."
        ) from exc
    return Path(folder), name


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    if "model_type" not in config:
        raise ModelLoadError(f"{path / 'config.json'} has no 'model_type', so the architecture is unknown.")
    return normalize_rope_config(config)


def check_safetensors(path: Path) -> None:
    """Read each safetensors header so a truncated or corrupt file is named, not a crash later."""
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(f"No model*.safetensors weight files in {path}.")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > size - 8:
                    raise ValueError("header length exceeds the file size")
                header = json.loads(fh.read(header_len))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            if ends and 8 + header_len + max(ends) > size:
                raise ValueError("tensor data is truncated")
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"Weight file {f} is not a valid safetensors file ({exc}).") from exc


def model_classes(config: dict[str, Any]) -> tuple[type, type]:
    """Our native classes for the model type, else mlx-lm's (whose sanitize first checks the LM head)."""
    module = native_module(config["model_type"])
    if module is not None:
        return module.Model, module.ModelArgs
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except ValueError as exc:
        raise ModelLoadError(
            f"Unknown model_type {config['model_type']!r}: no native implementation "
            f"({', '.join(sorted(NATIVE_ARCHITECTURES))}) and mlx-lm cannot load it either."
        ) from exc
    except (ImportError, SystemExit) as exc:  # a module that needs a missing package (some exit on import)
        raise ModelLoadError(f"mlx-lm's module for {config['model_type']!r} cannot be imported: {exc!r}.") from exc
    return _head_checked(model_class, config), args_class


def _head_checked(model_class: type, config: dict[str, Any]) -> type:
    """mlx-lm's class with a sanitize that refuses to drop a stored LM head transformers would use."""
    check = head_check(config)

    def sanitize(self: Any, weights: dict[str, Any]) -> dict[str, Any]:
        check(weights)
        parent = getattr(super(checked, self), "sanitize", None)
        return parent(weights) if parent is not None else weights

    checked = type(model_class.__name__, (model_class,), {"sanitize": sanitize, "__module__": model_class.__module__})
    return checked


def apply_config_overrides(config: dict[str, Any], overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """`config` with `overrides` set; a key that rope_parameters also holds is set there too."""
    if not overrides:
        return config
    config = dict(config)
    params = config.get("rope_parameters")
    for key, value in overrides.items():
        config[key] = value
        if isinstance(params, dict) and key in params:
            params = {**params, key: value}
    if isinstance(params, dict) and "rope_parameters" not in overrides:
        config["rope_parameters"] = params
    return normalize_rope_config(config)


def prepare_fallback_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config an mlx-lm class gets: normalised, and refused for any feature the class lacks."""
    try:
        config = normalize_fallback_config(config)
        check_fallback_config(config)  # before mlx-lm's module is imported: some exit the process
        _, args_class = model_classes(config)
        check_fallback_config(config, args_class)
        check_model_args(args_class, config)
    except FallbackRefused as exc:
        raise ModelLoadError(str(exc)) from None
    return config


def load_model(
    path_or_repo_id: Union[str, Path] = DEFAULT_MODEL_NAME,
    *,
    revision: Optional[str] = None,
    config_overrides: Optional[Mapping[str, Any]] = None,
    parallel: Optional[str] = None,
    cpu_dequantize: bool = False,
) -> ModelKit:
    """Load a model and its tokenizer. Remote code is never executed.

    `config_overrides` sets config.json keys before any class sees them (a key that
    `rope_parameters` holds too is set in both). It loads a model other than the checkpoint
    on disk, on purpose: for experiments, and to show that `verify` catches a model loaded
    wrong (`config_overrides={"rope_theta": 1.0}`). The kit records what was overridden.

    `parallel="tensor"`, inside an `mx.distributed` job, splits the model's heads and hidden
    units over the job's ranks (mlx_engine/distributed): each rank reads the checkpoint
    lazily and keeps its own slices. `parallel="pipeline"` gives each rank a contiguous range
    of blocks instead (a native architecture; hidden states passed rank to rank, captures
    delivered to rank 0). With one process either is the ordinary load.

    `cpu_dequantize=True` turns a 4/8-bit checkpoint into float32 layers at load, on MLX's
    CPU backend only (mlx_engine/cpu_dequantize.py says why and what it costs; `kit.dequantized`
    states it). The weights are the ones the quantized kernels compute with.
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path, model_id = resolve_model_path(path_or_repo_id, revision)
    config = apply_config_overrides(read_config(path), config_overrides)
    if native_module(config["model_type"]) is None:
        config = prepare_fallback_config(config)
    model_classes(config)  # fail on an unknown architecture before reading weights
    if parallel is not None:
        from .distributed import check_parallel

        check_parallel(config["model_type"], parallel)
    check_safetensors(path)
    try:
        model, config = mlx_lm_load_model(path, lazy=parallel is not None, model_config=config, get_model_classes=model_classes)
    except ModelLoadError:
        raise
    except FallbackRefused as exc:
        raise ModelLoadError(str(exc)) from None
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"Could not load the weights in {path}: {exc}") from exc
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer in {path}: {exc}") from exc
    if parallel is not None:
        from .distributed import parallelize

        parallelize(model, config, parallel)  # before hook_points(): the split sites get new points

    dequantized = None
    if cpu_dequantize:
        from .cpu_dequantize import CPUDequantizeError, dequantize_for_cpu

        try:
            dequantized = dequantize_for_cpu(model).describe()
        except CPUDequantizeError as exc:
            raise ModelLoadError(str(exc)) from None
    native = native_module(config["model_type"]) is not None
    if native:
        arch_info, points = model.arch_info, model.hook_points()
    else:
        from .models.generic import instrument

        arch_info, points = instrument(model, config)
    return ModelKit(
        model=model,
        tokenizer=tokenizer,
        config=config,
        path=path,
        model_id=model_id,
        native=native,
        arch_info=arch_info,
        hook_points=points,
        config_overrides=dict(config_overrides or {}),
        dequantized=dequantized,
    )


def tokenize(kit: ModelKit, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids for raw text (the tokenizer's own BOS handling)."""
    return list(kit.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def chat_tokens(kit: ModelKit, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of chat messages through the checkpoint's own chat template."""
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': ..., 'content': ...} message.")
    if kit.tokenizer.chat_template is None:
        raise ValueError(f"The model {kit.model_id!r} has no chat template; send raw text (tokenize) instead.")
    ids = kit.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
