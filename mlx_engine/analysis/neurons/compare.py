"""Two stores compared hook by hook: how each neuron's distribution moved, and how each layer's geometry did.

Per neuron, from the online statistics (no pass): the difference of means (b - a) and
of activation rates. Per neuron, over each store's bounded sample of rows: the two-sample
Kolmogorov-Smirnov statistic and p-value (scipy.stats.ks_2samp, exact or asymptotic as
scipy chooses) and the 1-Wasserstein distance (scipy.stats.wasserstein_distance). Per
hook, linear CKA (projections.linear_cka, Kornblith et al. 2019) of a against b, which
needs the same inputs: it is computed when both samples hold the same token ids (the same
corpus through two models or checkpoints), and reported as None otherwise.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np
import scipy.stats

from ...store.reader import ActivationStore
from .common import SAMPLE_ELEMENTS, NeuronError, check_hooks, hook_layer, sample_rows
from .projections import linear_cka


def compare_hook(a: ActivationStore, b: ActivationStore, hook: str, max_elements: int = SAMPLE_ELEMENTS, top: int = 10) -> dict[str, Any]:
    """One hook of two stores: per-neuron differences and distances, and the layer's CKA (JSON-ready)."""
    wa, wb = a.hook_info(check_hooks(a, hook)[0])["width"], b.hook_info(check_hooks(b, hook)[0])["width"]
    if wa != wb:
        raise NeuronError(f"{hook} has {wa} neurons in {a.path} but {wb} in {b.path}; they cannot be compared.")
    sa, sb = a.stats(hook), b.stats(hook)
    xa = sample_rows(a, [hook], max_elements)
    xb = sample_rows(b, [hook], max_elements)
    va, vb = xa.values[hook].astype(np.float64), xb.values[hook].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy falls back from the exact to the asymptotic p-value itself
        ks = scipy.stats.ks_2samp(va, vb, axis=0)
    wasserstein = np.array([scipy.stats.wasserstein_distance(va[:, i], vb[:, i]) for i in range(wa)])
    same = len(xa.rows) == len(xb.rows) and np.array_equal(xa.tokens, xb.tokens)
    cka = linear_cka(va, vb) if same else None
    mean_diff, rate_diff = sb.mean - sa.mean, sb.frac_active - sa.frac_active
    order = np.argsort(-np.nan_to_num(ks.statistic), kind="stable")[:top]
    return {
        "hook_id": hook, "layer": hook_layer(a, hook), "width": wa, "sample_rows_a": len(xa.rows), "sample_rows_b": len(xb.rows),
        "cka": cka, "cka_note": None if same else "the stores' sampled rows hold different tokens, so CKA is undefined",
        "mean_abs_mean_diff": float(np.abs(mean_diff).mean()), "mean_abs_rate_diff": float(np.abs(rate_diff).mean()),
        "ks_mean": float(np.nanmean(ks.statistic)), "ks_max": float(np.nanmax(ks.statistic)),
        "wasserstein_mean": float(wasserstein.mean()), "wasserstein_max": float(wasserstein.max()),
        "neurons": {"mean_diff": mean_diff.tolist(), "rate_diff": rate_diff.tolist(), "ks": ks.statistic.tolist(),
                    "ks_pvalue": ks.pvalue.tolist(), "wasserstein": wasserstein.tolist()},
        "most_changed": [{"neuron": int(i), "ks": float(ks.statistic[i]), "ks_pvalue": float(ks.pvalue[i]),
                          "wasserstein": float(wasserstein[i]), "mean_diff": float(mean_diff[i]), "rate_diff": float(rate_diff[i])}
                         for i in order],
    }


def compare_stores(a: ActivationStore, b: ActivationStore, hooks: Optional[Sequence[str]] = None,
                   max_elements: int = SAMPLE_ELEMENTS) -> dict[str, Any]:
    """Every hook the two stores share (or `hooks`), compared (JSON-ready)."""
    shared = [h for h in a.hooks if h in b.hooks] if hooks is None else list(hooks)
    if not shared:
        raise NeuronError(f"the stores share no hook: {a.path} holds {', '.join(a.hooks)}; {b.path} holds {', '.join(b.hooks)}.")
    return {"a": str(a.path), "b": str(b.path), "hooks": [compare_hook(a, b, h, max_elements) for h in shared]}
