"""Feature pages from an activation store, in Neuronpedia's fields.

For each feature: its top-activating examples over every stored row of the SAE's hook (each a
window of the same document around the row: `tokens` (strings), `values` (the feature's
activation at each token), `maxValue`, `maxValueTokenIndex`, Neuronpedia's activation format),
the histogram of its non-zero activations (`freq_hist_data_bar_heights` over bins of equal
width from 0 to its maximum, bin centres in `freq_hist_data_bar_values`), how often it fires
(`frac_nonzero`), and the logit effect of its decoder direction: W_dec[i] through the
unembedding (no final norm, as Neuronpedia's and SAELens's feature dashboards compute it), the
`logit_k` most promoted (`pos_str`, `pos_values`) and suppressed (`neg_str`, `neg_values`) tokens.
Two passes over the rows: maximum, frequency and top examples, then the histograms; memory is
one batch of features plus k examples per feature.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from ..hooks.names import resolve_hooks
from ..loading import ModelKit
from ..store.errors import StoreError
from ..store.reader import ActivationStore
from .model import SAE, SAEError


def store_hook_of(store: ActivationStore, sae: SAE, kit: Optional[ModelKit], hook: Optional[str] = None) -> str:
    """The store's hook holding the SAE's input: `hook`, the hook id it was trained on, or its hook's site."""
    if hook is not None:
        store.hook_info(hook)
        return hook
    trained = (sae.cfg.metadata.get("mlx_engine") or {}).get("hook_id")
    if trained in store.hooks:
        return trained
    if kit is not None and sae.cfg.hook_name:
        (site,) = resolve_hooks(kit.arch_info, kit.native, [sae.cfg.hook_name])
        for h in store.hooks:
            info = store.hook_info(h)
            if info["site"] == site.site and not info.get("indices"):
                return h
    raise StoreError(f"the store {store.path} holds no hook for this SAE ({sae.cfg.hook_name}); it holds {', '.join(store.hooks)}.")


def _token_text(kit: ModelKit, ids: Sequence[int]) -> list[str]:
    return [kit.tokenizer.decode([int(i)]) for i in ids]


def _encode(sae: SAE, rows: np.ndarray, features: np.ndarray) -> np.ndarray:
    return np.array(sae.encode(mx.array(np.asarray(rows, np.float32))).astype(mx.float32))[:, features]


def logit_effects(kit: ModelKit, sae: SAE, features: np.ndarray, k: int) -> Optional[list[dict[str, Any]]]:
    """Top promoted and suppressed tokens of each feature's decoder direction (None if it is not d_model wide)."""
    from ..analysis.unembed import unembedding

    if sae.cfg.d_out != kit.arch_info.d_model or k <= 0:
        return None
    head = unembedding(kit).head
    dirs = sae.W_dec[mx.array(features)].astype(mx.float32)
    logits = np.array(head(dirs).astype(mx.float32))
    out = []
    for row in logits:
        top, bottom = np.argsort(-row, kind="stable")[:k], np.argsort(row, kind="stable")[:k]
        out.append({
            "pos_str": _token_text(kit, top), "pos_values": row[top].tolist(), "pos_ids": top.tolist(),
            "neg_str": _token_text(kit, bottom), "neg_values": row[bottom].tolist(), "neg_ids": bottom.tolist(),
        })
    return out


def feature_pages(
    sae: SAE, store: Union[str, ActivationStore], kit: ModelKit, *, features: Optional[Sequence[int]] = None,
    hook: Optional[str] = None, top_k: int = 10, context: int = 8, bins: int = 20, logit_k: int = 10, batch_size: int = 4096,
) -> dict[str, Any]:
    """Pages for `features` (default: all) of `sae` over the store's rows (see the module docstring)."""
    store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    name = store_hook_of(store, sae, kit, hook)
    rows = store.rows(name)
    if rows.shape[1] != sae.d_in:
        raise SAEError(f"d_in mismatch: the store's {name} has width {rows.shape[1]}, the SAE reads {sae.d_in}.")
    feats = np.arange(sae.d_sae) if features is None else np.asarray(list(features), dtype=np.int64)
    if feats.size == 0 or feats.min() < 0 or feats.max() >= sae.d_sae:
        raise SAEError(f"features must lie in 0..{sae.d_sae - 1}.")
    n, f = len(rows), len(feats)
    top_v = np.full((top_k, f), -np.inf, np.float32)
    top_r = np.full((top_k, f), -1, np.int64)
    active, total, peak = np.zeros(f, np.int64), np.zeros(f, np.float64), np.zeros(f, np.float32)
    for lo in range(0, n, batch_size):
        acts = _encode(sae, rows[lo : lo + batch_size], feats)
        active += (acts > 0).sum(axis=0)
        total += acts.sum(axis=0, dtype=np.float64)
        peak = np.maximum(peak, acts.max(axis=0))
        pool_v = np.concatenate([top_v, acts])
        pool_r = np.concatenate([top_r, np.broadcast_to(np.arange(lo, lo + len(acts))[:, None], acts.shape)])
        order = np.argsort(-pool_v, axis=0, kind="stable")[:top_k]  # ties keep the earlier row
        top_v, top_r = np.take_along_axis(pool_v, order, 0), np.take_along_axis(pool_r, order, 0)
    heights = np.zeros((f, bins), np.int64)
    if bins > 0:
        for lo in range(0, n, batch_size):
            acts = _encode(sae, rows[lo : lo + batch_size], feats)
            where = np.nonzero(acts > 0)
            scale = np.where(peak > 0, peak, 1.0)[where[1]]
            np.add.at(heights, (where[1], np.minimum((acts[where] / scale * bins).astype(np.int64), bins - 1)), 1)
    tokens, (docs, poss) = store.tokens(), store.index()
    effects = logit_effects(kit, sae, feats, logit_k)
    pages = []
    for j, feature in enumerate(feats.tolist()):
        examples = []
        for value, row in zip(top_v[:, j], top_r[:, j]):
            if row < 0 or value <= 0:
                break
            lo, hi = max(0, int(row) - context), min(n, int(row) + context + 1)
            window = np.arange(lo, hi)[np.asarray(docs[lo:hi]) == int(docs[int(row)])]
            values = _encode(sae, rows[window], np.array([feature]))[:, 0]
            examples.append({
                "tokens": _token_text(kit, tokens[window].tolist()), "token_ids": tokens[window].tolist(), "values": values.tolist(),
                "maxValue": float(value), "maxValueTokenIndex": int(np.nonzero(window == row)[0][0]),
                "row": int(row), "doc": int(docs[int(row)]), "pos": int(poss[int(row)]),
            })
        width = float(peak[j]) / bins if bins else 0.0
        page = {
            "index": feature, "maxActApprox": float(peak[j]), "frac_nonzero": float(active[j] / n), "mean_activation": float(total[j] / n),
            "activations": examples,
            "freq_hist_data_bar_heights": heights[j].tolist(), "freq_hist_data_bar_values": [width * (b + 0.5) for b in range(bins)],
        }
        if effects is not None:
            page.update(effects[j])
        pages.append(page)
    return {
        "model": kit.model_id, "hook": name, "hook_name": sae.cfg.hook_name, "d_sae": sae.d_sae, "tokens": n,
        "architecture": sae.cfg.file_architecture, "features": pages,
    }
