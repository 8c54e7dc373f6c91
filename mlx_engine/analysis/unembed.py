"""The model's own way out of the residual stream: final norm, unembedding, soft-capping.

A small adapter over the loaded Model classes (ours and mlx-lm's): the final norm is
`model.model.norm` (Llama, gpt-oss, mlx-lm's families) or `model.model.ln_f` (GPT-2);
the head is `lm_head`, or the tied embedding's `as_linear`; Gemma-style models cap the
final logits with `cap * tanh(logits / cap)` (`final_logit_softcapping`). Running a
residual through `Unembedding.logits` is what the model does after its last block, so
the logit lens at the last layer reproduces the model's logits.

Direct logit attribution needs the final norm as a linear map. The standard device
(Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"; TransformerLens'
`apply_ln_to_stack`) freezes the norm's scale at its value on the real final residual:
RMSNorm(x) = g * x / rms(x) becomes c -> g * c / rms(x_final); LayerNorm additionally
centres c and keeps its bias as a constant term. `linearised_norm` checks the frozen map
reproduces the real norm on the real residual, so an unfamiliar norm is refused, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading import ModelKit
from .common import AnalysisError, dense_weight, to_numpy

NORM_NAMES = ("norm", "ln_f", "final_layernorm", "norm_f")
EMBEDDING_NAMES = ("embed_tokens", "wte", "tok_embeddings", "embed")
NORM_CHECK_RTOL = 1e-3


@dataclass
class LinearNorm:
    """The final norm frozen at one residual: out = gain * P(c) / scale + bias (P centres for LayerNorm)."""

    gain: np.ndarray  # [d]
    bias: Optional[np.ndarray]  # [d] or None
    scale: float
    centred: bool

    def direction(self, unembed: np.ndarray) -> np.ndarray:
        """The residual direction u with c . u = (frozen norm of c) . unembed: P(gain * unembed) / scale."""
        u = self.gain * unembed
        if self.centred:
            u = u - u.mean()
        return u / self.scale


@dataclass
class Unembedding:
    """Final norm, head and soft-cap of one model, found once by `unembedding(kit)`."""

    norm: nn.Module
    head_module: nn.Module
    head: Callable[[mx.array], mx.array]
    softcap: Optional[float]
    norm_path: str
    head_path: str

    def raw_logits(self, residual: mx.array) -> mx.array:
        """Logits before any soft-cap: head(norm(residual)), residual [..., d_model]."""
        return self.head(self.norm(residual))

    def logits(self, residual: mx.array) -> mx.array:
        """What the model's own forward makes of this residual after its last block."""
        out = self.raw_logits(residual)
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out

    def rows(self, token_ids: Sequence[int]) -> np.ndarray:
        """Unembedding vectors of the tokens, [k, d_model] float64 (dequantized where quantized)."""
        return to_numpy(dense_weight(self.head_module, rows=list(token_ids)))

    def head_bias(self, token_ids: Sequence[int]) -> Optional[np.ndarray]:
        if isinstance(self.head_module, (nn.Linear, nn.QuantizedLinear)) and "bias" in self.head_module:
            return to_numpy(self.head_module.bias)[list(token_ids)]
        return None

    def linearised_norm(self, final_residual: np.ndarray) -> LinearNorm:
        """The final norm frozen at `final_residual` [d] (see the module docstring), checked on that residual."""
        x = np.asarray(final_residual, dtype=np.float64)
        norm = self.norm
        eps = getattr(norm, "eps", None)
        if eps is None:
            raise AnalysisError(f"the final norm {type(norm).__name__} ({self.norm_path}) has no eps; cannot freeze its scale.")
        if isinstance(norm, nn.LayerNorm):
            gain = to_numpy(norm.weight) if "weight" in norm else np.ones_like(x)
            bias = to_numpy(norm.bias) if "bias" in norm else None
            linear = LinearNorm(gain, bias, float(np.sqrt(np.var(x) + eps)), centred=True)
        else:
            # Any RMS-type norm is g * x / sqrt(mean(x^2) + eps); its effective g (Gemma's 1 + w
            # included) is what it makes of the all-ones vector, times sqrt(1 + eps).
            ones = mx.ones((1, x.shape[-1]), dtype=mx.float32)
            gain = to_numpy(norm(ones))[0] * np.sqrt(1.0 + eps)
            linear = LinearNorm(gain, None, float(np.sqrt(np.mean(x * x) + eps)), centred=False)
        frozen = linear.gain * ((x - x.mean()) if linear.centred else x) / linear.scale
        if linear.bias is not None:
            frozen = frozen + linear.bias
        actual = to_numpy(norm(mx.array(x.astype(np.float32))[None]))[0]
        if not np.allclose(frozen, actual, rtol=NORM_CHECK_RTOL, atol=NORM_CHECK_RTOL * float(np.abs(actual).max())):
            raise AnalysisError(
                f"the final norm {type(norm).__name__} ({self.norm_path}) is neither an RMS norm nor a LayerNorm: "
                "freezing its scale does not reproduce it, so direct logit attribution cannot run on this model."
            )
        return linear


def _inner(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None:
        raise AnalysisError(f"{type(model).__name__} has no inner `model` module; the unembedding adapter cannot find its final norm.")
    return inner


def unembedding(kit: ModelKit) -> Unembedding:
    """Find the final norm, head and soft-cap of `kit`'s model; a model without them is refused by name."""
    model = kit.model
    inner = _inner(model)
    norm_name = next((n for n in NORM_NAMES if isinstance(getattr(inner, n, None), nn.Module)), None)
    if norm_name is None:
        raise AnalysisError(f"{type(model).__name__} has no final norm at model.{{{', '.join(NORM_NAMES)}}}.")
    head: Any = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        head_module, head_fn, head_path = head, head, "lm_head"
    else:
        emb_name = next((n for n in EMBEDDING_NAMES if isinstance(getattr(inner, n, None), nn.Module)), None)
        if emb_name is None:
            raise AnalysisError(f"{type(model).__name__} has neither lm_head nor a tied embedding at model.{{{', '.join(EMBEDDING_NAMES)}}}.")
        head_module = getattr(inner, emb_name)
        head_fn, head_path = head_module.as_linear, f"model.{emb_name} (tied)"
    args = getattr(model, "args", None)
    softcap = getattr(args, "final_logit_softcapping", None) or getattr(model, "final_logit_softcapping", None)
    return Unembedding(getattr(inner, norm_name), head_module, head_fn, float(softcap) if softcap else None, f"model.{norm_name}", head_path)


def attention_module(kit: ModelKit, layer: int) -> nn.Module:
    """Layer `layer`'s attention module (`self_attn`, or GPT-2's `attn`)."""
    block = kit.model.layers[layer]
    for name in ("self_attn", "attn", "attention"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise AnalysisError(f"layer {layer} ({type(block).__name__}) has no attention module the adapter knows.")


def output_projection(kit: ModelKit, layer: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Layer `layer`'s attention output projection as (W_O [d_model, n_heads * head_dim], bias or None)."""
    attn = attention_module(kit, layer)
    proj = next((getattr(attn, n) for n in ("o_proj", "c_proj", "out_proj", "dense") if isinstance(getattr(attn, n, None), nn.Module)), None)
    if proj is None:
        raise AnalysisError(f"layer {layer}'s attention ({type(attn).__name__}) has no output projection (o_proj / c_proj).")
    bias = to_numpy(proj.bias) if "bias" in proj else None
    return to_numpy(dense_weight(proj)), bias
