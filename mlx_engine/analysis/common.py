"""What every analysis shares: token look-up, range checks, and weights as dense float arrays.

A bad request fails here with an `AnalysisError` that says what was wrong and what is
valid, before any forward pass runs. Quantized matrices are read through
`mx.dequantize`, the same call the quantized layers compute with, so a table of a
4-bit model describes the weights the model actually multiplies by.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..loading import ModelKit, tokenize

Token = Union[str, int]


class AnalysisError(ValueError):
    """A request an analysis cannot run as written (unknown token, bad length, layer out of range)."""


def prompt_tokens(kit: ModelKit, text_or_tokens: Union[str, Sequence[int]]) -> list[int]:
    """Token ids of a prompt: text through the model's tokenizer, or ids checked against the vocabulary."""
    if isinstance(text_or_tokens, str):
        tokens = tokenize(kit, text_or_tokens)
    else:
        tokens = [int(t) for t in text_or_tokens]
    if not tokens:
        raise AnalysisError("The prompt is empty: give at least one token.")
    vocab = kit.arch_info.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise AnalysisError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
    return tokens


def resolve_token(kit: ModelKit, token: Token) -> int:
    """One token id from an id, a vocabulary entry ("Ġthe") or text that is exactly one token (" the")."""
    vocab_size = kit.arch_info.vocab_size
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < vocab_size:
            raise AnalysisError(f"token id {int(token)} is outside the vocabulary [0, {vocab_size}).")
        return int(token)
    if not isinstance(token, str) or token == "":
        raise AnalysisError(f"a token is an id or a non-empty string, got {token!r}.")
    vocab = kit.tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    ids = kit.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    pieces = [kit.tokenizer.decode([i]) for i in ids]
    raise AnalysisError(
        f"{token!r} is not one token of this tokenizer: it encodes to {len(ids)} tokens {pieces!r} (ids {list(ids)}); "
        "give a single token (a vocabulary entry, text that encodes to one token, or an id)."
    )


def token_strings(kit: ModelKit, ids: Iterable[int]) -> list[str]:
    """Each id decoded on its own: what a reader sees of that token (leading spaces kept)."""
    return [kit.tokenizer.decode([int(i)]) for i in ids]


def label(text: str, width: int = 12) -> str:
    """A token string fit for an axis label: control characters escaped, long ones shortened."""
    shown = json.dumps(text, ensure_ascii=False)[1:-1]
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def check_position(position: int, length: int) -> int:
    """An absolute position in [0, length) from a position that may count from the end (-1 = last)."""
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
        raise AnalysisError(f"position must be an integer, got {position!r}.")
    p = int(position) + (length if position < 0 else 0)
    if not 0 <= p < length:
        raise AnalysisError(f"position {position} is out of range for a prompt of {length} tokens (valid: {-length}..{length - 1}).")
    return p


def check_layers(kit: ModelKit, layers: Optional[Iterable[int]]) -> list[int]:
    """Layer indices in range, in order; None means every layer."""
    n = kit.arch_info.num_layers
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n:
            raise AnalysisError(f"layer {layer!r} is out of range: this model has layers 0..{n - 1}.")
        out.append(int(layer))
    if not out:
        raise AnalysisError("layers is empty: give at least one layer, or None for every layer.")
    return sorted(set(out))


def check_heads(kit: ModelKit, heads: Optional[Iterable[int]]) -> list[int]:
    """Head indices in range; None means every head."""
    n = kit.arch_info.n_heads
    if heads is None:
        return list(range(n))
    out = sorted({int(h) for h in heads})
    if not out or out[0] < 0 or out[-1] >= n:
        raise AnalysisError(f"heads {list(heads)} are out of range: this model has heads 0..{n - 1}.")
    return out


def to_numpy(array: mx.array) -> np.ndarray:
    """An MLX array as float64 numpy (bfloat16 and float16 widened first)."""
    return np.array(array.astype(mx.float32), dtype=np.float64)


def is_quantized(module: Any) -> bool:
    return "scales" in module


def dense_weight(module: Any, rows: Optional[Sequence[int]] = None) -> mx.array:
    """A layer's weight as float32, dequantized with mx.dequantize where it is quantized.

    `rows` picks rows of the last-but-one axis first (quantization groups run along the
    last axis, so a row dequantizes on its own): an unembedding's few token rows cost
    nothing however large the vocabulary is.
    """
    weight, scales, biases = module.weight, module.get("scales"), module.get("biases")
    if rows is not None:
        index = mx.array(list(rows))
        weight = mx.take(weight, index, axis=-2)
        scales = None if scales is None else mx.take(scales, index, axis=-2)
        biases = None if biases is None else mx.take(biases, index, axis=-2)
    if scales is None:
        return weight.astype(mx.float32)
    mode = getattr(module, "mode", "affine")
    return mx.dequantize(weight, scales, biases, module.group_size, module.bits, mode=mode).astype(mx.float32)


def storage(module: Any) -> str:
    """How a layer stores its weight: "float32", or e.g. "4-bit affine, group 32"."""
    if is_quantized(module):
        return f"{module.bits}-bit {getattr(module, 'mode', 'affine')}, group {module.group_size}"
    return str(module.weight.dtype).replace("mlx.core.", "")


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def split_layer(path: str) -> tuple[Optional[int], str]:
    """A module path as (layer, component): "model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj")."""
    match = _LAYER_RE.search(path)
    if match is None:
        return None, path.removeprefix("model.")
    return int(match.group(1)), path[match.end():]
