"""Logit lens: every layer's residual stream read through the model's own final norm and head.

nostalgebraist (2020), "interpreting GPT: the logit lens": decode the residual stream after
each block as if it were the last. The embedding (what enters block 0) is the first row,
then the residual after each block; the last row is what the model itself decodes, so it
equals the model's logits (soft-capped where the model caps them; see unembed.py).

Per layer and position: the top-k tokens and probabilities, the rank (0 = most likely) and
probability of the next token (the prompt's next token; at the last position the model's own
greedy choice), and KL(final || layer), the information the later layers still add
(scipy.stats.entropy of the two distributions, in nats).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import mlx.core as mx
import numpy as np
from scipy.special import softmax
from scipy.stats import entropy

from ..generation.api import run_with_cache
from ..loading import ModelKit
from .common import AnalysisError, prompt_tokens, to_numpy, token_strings
from .unembed import unembedding


@dataclass
class LogitLens:
    """One prompt's logit lens; arrays are [rows, positions(, k)], rows = `layers`."""

    tokens: list[int]
    token_strings: list[str]
    layers: list[str]  # "embedding", "0", "1", ...
    top_ids: np.ndarray  # [rows, T, k]
    top_probs: np.ndarray  # [rows, T, k]
    top_strings: list[list[list[str]]]
    next_ids: list[int]  # [T]: the token each position predicts
    next_strings: list[str]
    next_rank: np.ndarray  # [rows, T]
    next_prob: np.ndarray  # [rows, T]
    kl_to_final: np.ndarray  # [rows, T], nats
    final_logits_max_error: float  # |lens at the last layer - the model's own logits|, max

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_strings": self.token_strings,
            "layers": self.layers,
            "top_ids": self.top_ids.tolist(),
            "top_probs": self.top_probs.tolist(),
            "top_strings": self.top_strings,
            "next_ids": self.next_ids,
            "next_strings": self.next_strings,
            "next_rank": self.next_rank.tolist(),
            "next_prob": self.next_prob.tolist(),
            "kl_to_final": self.kl_to_final.tolist(),
            "final_logits_max_error": self.final_logits_max_error,
        }


def residual_hooks(kit: ModelKit) -> list[dict[str, Any]]:
    """The embedding and every layer's residual: the rows of the lens."""
    return [{"layer_name": "embedding", "component": "embedding"}] + [
        {"layer_name": i, "component": "residual"} for i in range(kit.arch_info.num_layers)
    ]


def lens_logits(kit: ModelKit, residual: mx.array) -> mx.array:
    """One residual [T, d_model] decoded as the model decodes its last block's output: [T, vocab]."""
    return unembedding(kit).logits(residual)


def logit_lens(kit: ModelKit, text_or_tokens: Union[str, Sequence[int]], *, top_k: int = 5) -> LogitLens:
    """The logit lens of a prompt (see the module docstring)."""
    tokens = prompt_tokens(kit, text_or_tokens)
    vocab = kit.arch_info.vocab_size
    if not 1 <= top_k <= vocab:
        raise AnalysisError(f"top_k must be in 1..{vocab}, got {top_k}.")
    cache = run_with_cache(kit, tokens, residual_hooks(kit))
    unembed = unembedding(kit)
    model_logits = to_numpy(cache.logits)
    final_probs = softmax(model_logits, axis=-1)
    next_ids = tokens[1:] + [int(np.argmax(model_logits[-1]))]
    rows = [("embedding", cache["embedding"])] + [(str(i), cache[f"layers.{i}.residual"]) for i in range(kit.arch_info.num_layers)]
    top_ids, top_probs, ranks, next_prob, kl = [], [], [], [], []
    positions = np.arange(len(tokens))
    error = 0.0
    for name, residual in rows:
        logits = to_numpy(unembed.logits(residual))
        probs = softmax(logits, axis=-1)
        part = np.argpartition(-probs, top_k - 1, axis=-1)[:, :top_k]
        order = np.argsort(-np.take_along_axis(probs, part, axis=-1), axis=-1, kind="stable")
        ids = np.take_along_axis(part, order, axis=-1)
        top_ids.append(ids)
        top_probs.append(np.take_along_axis(probs, ids, axis=-1))
        chosen = logits[positions, next_ids]
        ranks.append((logits > chosen[:, None]).sum(axis=-1))
        next_prob.append(probs[positions, next_ids])
        kl.append(entropy(final_probs, probs, axis=-1))
        if name == rows[-1][0]:
            error = float(np.abs(logits - model_logits).max())
    top_ids_arr = np.stack(top_ids)
    return LogitLens(
        tokens=tokens,
        token_strings=token_strings(kit, tokens),
        layers=[name for name, _ in rows],
        top_ids=top_ids_arr,
        top_probs=np.stack(top_probs),
        top_strings=[[token_strings(kit, ids) for ids in layer] for layer in top_ids_arr],
        next_ids=next_ids,
        next_strings=token_strings(kit, next_ids),
        next_rank=np.stack(ranks),
        next_prob=np.stack(next_prob),
        kl_to_final=np.stack(kl),
        final_logits_max_error=error,
    )
