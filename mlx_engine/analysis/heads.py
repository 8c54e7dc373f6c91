"""Attention heads scored on what they attend to, and ranked by what removing them costs.

Pattern scores, per head, averaged over query positions (Olsson et al. 2022, "In-context
Learning and Induction Heads"; the ARENA / TransformerLens conventions):
  - entropy: Shannon entropy (nats, scipy.stats.entropy) of each attention row, the
    sink's share counted as one more outcome where the model has sinks;
  - previous-token score: mean attention from position i to i-1;
  - sink mass (gpt-oss): mean of 1 - sum of the row over real keys, the probability the
    learned sink logit takes;
and, on a random token sequence of length n repeated twice (after BOS where the tokenizer
has one), over the second copy's positions i:
  - duplicate-token score: mean attention to i - n (the earlier occurrence of the same token);
  - induction score: mean attention to i - n + 1 (the token after that occurrence).
Entropy, previous-token score and sink mass are read on the text when one is given, else
on the repeated sequence.

Importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"; mean ablation
as in Wang et al. 2022, IOI): the change in mean next-token cross-entropy on the text when
the head's z (its output before W_O) is zeroed, or replaced by its mean over the text's
positions, at every position: interventions on z with heads=[h].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
from scipy.special import log_softmax
from scipy.stats import entropy
from tqdm.auto import tqdm

from ..generation.api import run_with_cache
from ..generation.cache import ActivationCache
from ..loading import ModelKit
from .common import AnalysisError, prompt_tokens, to_numpy
from .unembed import attention_module

METRICS = ("entropy", "previous_token", "duplicate_token", "induction", "sink_mass", "importance_zero", "importance_mean")


@dataclass
class HeadScores:
    """Per-head tables [layers, heads]; a metric not measured is None."""

    n_layers: int
    n_heads: int
    tables: dict[str, Optional[np.ndarray]]
    repeat_length: int
    repeated_tokens: list[int]
    text_tokens: Optional[list[int]]
    clean_loss: Optional[float]

    def ranked(self, metric: str) -> list[dict[str, Any]]:
        """(layer, head, value) rows, largest first."""
        table = self.tables.get(metric)
        if table is None:
            raise AnalysisError(f"metric {metric!r} was not measured; measured: {', '.join(k for k, v in self.tables.items() if v is not None)}.")
        order = np.argsort(-table, axis=None, kind="stable")
        return [{"layer": int(i // self.n_heads), "head": int(i % self.n_heads), "value": float(table.flat[i])} for i in order]

    def rows(self) -> list[dict[str, Any]]:
        """One row per head with every measured metric: the long table behind the figures."""
        out = []
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                row: dict[str, Any] = {"layer": layer, "head": head}
                row.update({m: float(t[layer, head]) for m, t in self.tables.items() if t is not None})
                out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "repeat_length": self.repeat_length,
            "repeated_tokens": self.repeated_tokens,
            "text_tokens": self.text_tokens,
            "clean_loss": self.clean_loss,
            "tables": {m: None if t is None else t.tolist() for m, t in self.tables.items()},
            "ranked": {m: self.ranked(m)[:10] for m, t in self.tables.items() if t is not None},
        }


def repeated_random_tokens(kit: ModelKit, n: int, seed: int = 0) -> tuple[list[int], int]:
    """[BOS] + r + r for r a random sequence of n distinct non-special tokens; returns (tokens, offset of r)."""
    if n < 2:
        raise AnalysisError(f"the repeated sequence needs n >= 2 tokens, got {n}.")
    special = set(kit.tokenizer.all_special_ids)
    pool = np.array(sorted(i for i in kit.tokenizer.get_vocab().values() if i not in special and i < kit.arch_info.vocab_size))
    if len(pool) < n:
        raise AnalysisError(f"the vocabulary has only {len(pool)} ordinary tokens; n={n} is too long.")
    r = np.random.default_rng(seed).choice(pool, size=n, replace=False).tolist()
    bos = kit.tokenizer.bos_token_id
    prefix = [] if bos is None else [int(bos)]
    return prefix + r + r, len(prefix)


def _pattern_hooks(kit: ModelKit) -> list[dict[str, Any]]:
    return [{"layer_name": i, "component": "attention_pattern"} for i in range(kit.arch_info.num_layers)]


def _patterns(cache: ActivationCache, n_layers: int) -> list[np.ndarray]:
    out = []
    for i in range(n_layers):
        pattern = to_numpy(cache[f"layers.{i}.attention_pattern"])  # [H, T, S]
        if pattern.shape[1] != pattern.shape[2]:
            raise AnalysisError(f"layer {i}'s pattern is not square ({pattern.shape}); pattern scores need one prompt pass.")
        out.append(pattern)
    return out


def _has_sinks(kit: ModelKit) -> bool:
    return any("sinks" in attention_module(kit, i) for i in range(kit.arch_info.num_layers))


def _text_scores(patterns: list[np.ndarray], sinks: bool) -> dict[str, np.ndarray]:
    """Entropy, previous-token score and sink mass per head, [layers, heads]."""
    ent, prev, sink = [], [], []
    for pattern in patterns:
        mass = 1.0 - pattern.sum(axis=-1)  # [H, T]: what the sink took
        rows = np.concatenate([pattern, np.clip(mass, 0.0, None)[..., None]], axis=-1) if sinks else pattern
        ent.append(entropy(rows, axis=-1).mean(axis=-1))
        prev.append(np.diagonal(pattern, offset=-1, axis1=1, axis2=2).mean(axis=-1))
        sink.append(mass.mean(axis=-1))
    out = {"entropy": np.stack(ent), "previous_token": np.stack(prev)}
    if sinks:
        out["sink_mass"] = np.stack(sink)
    return out


def _repeat_scores(patterns: list[np.ndarray], offset: int, n: int) -> dict[str, np.ndarray]:
    """Duplicate-token and induction scores per head over the second copy's positions."""
    second = np.arange(offset + n, offset + 2 * n)
    dup = np.stack([p[:, second, second - n].mean(axis=-1) for p in patterns])
    ind = np.stack([p[:, second, second - n + 1].mean(axis=-1) for p in patterns])
    return {"duplicate_token": dup, "induction": ind}


def mean_loss(logits: np.ndarray, tokens: Sequence[int]) -> float:
    """Mean next-token cross-entropy (nats) of logits [T, vocab] on the prompt's own continuation."""
    if len(tokens) < 2:
        raise AnalysisError("a loss needs a text of at least 2 tokens.")
    logp = log_softmax(logits[:-1], axis=-1)
    return float(-logp[np.arange(len(tokens) - 1), list(tokens[1:])].mean())


def head_importance(
    kit: ModelKit, text_or_tokens: Union[str, Sequence[int]], *, ops: Sequence[str] = ("zero", "mean"), progress: bool = True
) -> tuple[dict[str, np.ndarray], float]:
    """Loss change per head [layers, heads] for each ablation op ("zero", "mean"), and the clean loss."""
    tokens = prompt_tokens(kit, text_or_tokens)
    bad = [op for op in ops if op not in ("zero", "mean")]
    if bad:
        raise AnalysisError(f"unknown ablation {bad}; valid: zero, mean.")
    info = kit.arch_info
    clean = run_with_cache(kit, tokens, [{"layer_name": i, "component": "z"} for i in range(info.num_layers)])
    clean_loss = mean_loss(to_numpy(clean.logits), tokens)
    out = {op: np.zeros((info.num_layers, info.n_heads)) for op in ops}
    sites = [(op, layer, head) for op in ops for layer in range(info.num_layers) for head in range(info.n_heads)]
    for op, layer, head in tqdm(sites, desc="head ablations", disable=not progress, leave=False):
        spec: dict[str, Any] = {"layer_name": layer, "component": "z", "op": op, "heads": [head]}
        if op == "mean":
            spec["source"] = clean
        logits = to_numpy(run_with_cache(kit, tokens, interventions=[spec]).logits)
        out[op][layer, head] = mean_loss(logits, tokens) - clean_loss
    return out, clean_loss


def head_scores(
    kit: ModelKit,
    text: Optional[Union[str, Sequence[int]]] = None,
    *,
    repeat_length: int = 20,
    seed: int = 0,
    importance: bool = True,
    progress: bool = True,
) -> HeadScores:
    """Every head's pattern scores, and (with a text and `importance`) its ablation importance."""
    if not kit.native:
        raise AnalysisError(f"head scores need attention patterns and z, which only native architectures offer; {kit.model_type!r} is not native.")
    info = kit.arch_info
    sinks = _has_sinks(kit)
    repeated, offset = repeated_random_tokens(kit, repeat_length, seed)
    rep_patterns = _patterns(run_with_cache(kit, repeated, _pattern_hooks(kit)), info.num_layers)
    tables: dict[str, Optional[np.ndarray]] = dict.fromkeys(METRICS)
    tables.update(_repeat_scores(rep_patterns, offset, repeat_length))
    text_tokens = None if text is None else prompt_tokens(kit, text)
    if text_tokens is not None and len(text_tokens) >= 2:
        tables.update(_text_scores(_patterns(run_with_cache(kit, text_tokens, _pattern_hooks(kit)), info.num_layers), sinks))
    else:
        tables.update(_text_scores(rep_patterns, sinks))
    clean_loss = None
    if importance and text_tokens is not None:
        ablations, clean_loss = head_importance(kit, text_tokens, progress=progress)
        tables["importance_zero"], tables["importance_mean"] = ablations["zero"], ablations["mean"]
    return HeadScores(info.num_layers, info.n_heads, tables, repeat_length, repeated, text_tokens, clean_loss)
