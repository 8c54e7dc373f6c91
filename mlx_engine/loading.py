"""Load a checkpoint (local folder or Hugging Face repo id) into a ModelKit.

The model class is ours when we have a native instrumented file for the config's
`model_type`, and mlx-lm's otherwise. Every config is normalised first
(`rope_parameters` -> `rope_theta`/`rope_scaling`), so no class ever falls back
silently to default RoPE settings. mlx-lm's `load_model` does the weight plumbing
(sanitize, quantized layers for MLX conversions and MXFP4, strict loading) with our
class lookup plugged in.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .hooks.architecture import ArchitectureInfo
from .hooks.point import HookPoint
from .models import NATIVE_ARCHITECTURES, native_module
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

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
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
    """Our native classes for the model type, else mlx-lm's."""
    module = native_module(config["model_type"])
    if module is not None:
        return module.Model, module.ModelArgs
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError as exc:
        raise ModelLoadError(
            f"Unknown model_type {config['model_type']!r}: no native implementation "
            f"({', '.join(sorted(NATIVE_ARCHITECTURES))}) and mlx-lm cannot load it either."
        ) from exc


def load_model(path_or_repo_id: Union[str, Path] = DEFAULT_MODEL_NAME, *, revision: Optional[str] = None) -> ModelKit:
    """Load a model and its tokenizer. Remote code is never executed."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path, model_id = resolve_model_path(path_or_repo_id, revision)
    config = read_config(path)
    model_classes(config)  # fail on an unknown architecture before reading weights
    check_safetensors(path)
    try:
        model, config = mlx_lm_load_model(path, model_config=config, get_model_classes=model_classes)
    except ModelLoadError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"Could not load the weights in {path}: {exc}") from exc
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer in {path}: {exc}") from exc

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
