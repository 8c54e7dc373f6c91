"""Statistics per neuron and per layer: moments and activity from the store's online state, the
distribution (histograms, quantiles, outliers, saturation) from a bounded sample of rows.

From the online statistics (store/stats.py; no pass over the rows): mean, std, skewness,
kurtosis (population, as scipy.stats.skew / kurtosis with bias=True), min, max, fraction
active (x > the store's threshold), the per-neuron participation ratio over tokens, and
dead neurons: never above the threshold t, which is `maximum <= t` (so any t at or above the
store's threshold needs no pass). A layer's pooled moments (all its values as one
population) merge the neurons' central moments with the same pairwise update the store
uses (Chan, Golub & LeVeque 1979; Pébay 2008), in a tree of log2(width) merges.

Sparsity of a layer: fraction active (of all token x neuron values), the participation
ratio of the neurons' L1 mass m_i = sum_t |x_ti|, PR = (sum m)^2 / sum m^2 (the effective
number of neurons carrying the mass; Gao et al. 2017 use the same ratio on eigenvalues),
and the compression potential: the smallest share of neurons whose L1 mass reaches 90%.

The store keeps no histogram state, so the distribution comes from `sample_rows`: rows
spaced evenly over the store, at most `max_elements` values (every row when the store is
that small, which makes the numbers exact). Over the sample: per-neuron histograms
(np.histogram, `bins` equal bins between the neuron's online min and max, so every row of
the store falls inside), quartiles (np.quantile, linear), outliers by the z-score rule
(|x - mean| > z std, mean and std online) and by Tukey's IQR rule (outside
[Q1 - 1.5 IQR, Q3 + 1.5 IQR]; Tukey 1977), and saturation: with `bounds` (a bounded
activation: tanh (-1, 1), sigmoid (0, 1)) the fraction of rows within `tolerance` x range of
a bound; without, the fraction of rows above the layer's `quantile` (np.quantile over all its
sampled values). A neuron is saturated where that fraction exceeds `saturated_fraction`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np

from ...store.reader import ActivationStore
from ...store.stats import NeuronStats
from .common import SAMPLE_ELEMENTS, Sample, check_hooks, hook_layer, sample_rows

L1_MASS = 0.9


def _columns(state: NeuronStats, cols: slice) -> NeuronStats:
    arrays = {f: getattr(state, f)[cols] for f in ("mean", "m2", "m3", "m4", "minimum", "maximum", "above", "abs_sum")}
    tops = {f: getattr(state, f)[:, cols] for f in ("top_values", "top_doc", "top_pos")}
    return replace(state, width=len(arrays["mean"]), **arrays, **tops)


def pooled(state: NeuronStats) -> NeuronStats:
    """The width-1 state of every value of every neuron together: column halves merged pairwise."""
    parts = state
    extra: list[NeuronStats] = []
    while parts.width > 1:
        half = parts.width // 2
        if parts.width % 2:
            extra.append(_columns(parts, slice(parts.width - 1, parts.width)))
        parts = _columns(parts, slice(0, half)).merge(_columns(parts, slice(half, 2 * half)))
    for e in extra:
        parts = parts.merge(e)
    return parts


def l1_participation(abs_sum: np.ndarray) -> float:
    """(sum m)^2 / sum m^2 over the neurons' L1 masses m: 1 when one neuron holds all, width when all are equal."""
    total = float(np.sum(abs_sum**2))
    return float(np.sum(abs_sum) ** 2 / total) if total > 0 else float("nan")


def mass_share(abs_sum: np.ndarray, mass: float = L1_MASS) -> float:
    """The smallest share of neurons whose L1 mass reaches `mass` of the layer's (largest first)."""
    ordered = np.sort(abs_sum)[::-1]
    total = ordered.sum()
    if total <= 0:
        return float("nan")
    needed = int(np.searchsorted(np.cumsum(ordered), mass * total, side="left")) + 1
    return min(needed, len(ordered)) / len(ordered)


@dataclass
class NeuronTable:
    """One hook's per-neuron statistics from the online state (see the module docstring)."""

    hook: str
    layer: Optional[int]
    count: int
    threshold: float
    dead_threshold: float
    state: NeuronStats

    @property
    def width(self) -> int:
        return self.state.width

    @property
    def dead(self) -> np.ndarray:
        return self.state.maximum <= self.dead_threshold

    def columns(self) -> dict[str, np.ndarray]:
        s = self.state
        return {"mean": s.mean, "std": s.std, "skewness": s.skewness, "kurtosis": s.kurtosis, "min": s.minimum,
                "max": s.maximum, "frac_active": s.frac_active, "participation_ratio": s.participation_ratio,
                "mean_abs": s.abs_sum / max(s.count, 1), "dead": self.dead}

    def rows(self) -> list[dict[str, Any]]:
        cols = self.columns()
        return [{"hook_id": self.hook, "layer": self.layer, "neuron": i,
                 **{k: (bool(v[i]) if k == "dead" else float(v[i])) for k, v in cols.items()}} for i in range(self.width)]

    def to_json(self) -> dict[str, Any]:
        return {"hook_id": self.hook, "layer": self.layer, "tokens": self.count, "threshold": self.threshold,
                "dead_threshold": self.dead_threshold,
                **{k: v.tolist() for k, v in self.columns().items()}, "dead_neurons": np.nonzero(self.dead)[0].tolist()}


def neuron_table(store: ActivationStore, hook: str, dead_threshold: Optional[float] = None) -> NeuronTable:
    """Per-neuron moments and activity of `hook` from the store's online statistics (no pass over rows)."""
    check_hooks(store, hook)
    state = store.stats(hook)
    t = state.threshold if dead_threshold is None else float(dead_threshold)
    return NeuronTable(hook, hook_layer(store, hook), state.count, state.threshold, t, state)


@dataclass
class Distribution:
    """One hook's distribution over a bounded sample (see the module docstring for each rule)."""

    hook: str
    layer: Optional[int]
    sample_rows: int
    total_rows: int
    edges: np.ndarray  # [width, bins + 1]
    counts: np.ndarray  # [width, bins]
    pooled_edges: np.ndarray  # [bins + 1], between the hook's online min and max
    pooled_counts: np.ndarray  # [bins]
    quartiles: np.ndarray  # [3, width]: Q1, median, Q3
    z_outliers: np.ndarray  # [width] counts in the sample
    iqr_outliers: np.ndarray
    saturation: np.ndarray  # [width] fraction of sampled rows near a bound / above the layer quantile
    saturated: np.ndarray  # [width] bool
    rule: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"hook_id": self.hook, "layer": self.layer, "sample_rows": self.sample_rows, "total_rows": self.total_rows,
                "rule": self.rule, "edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "pooled_edges": self.pooled_edges.tolist(), "pooled_counts": self.pooled_counts.tolist(),
                "q1": self.quartiles[0].tolist(), "median": self.quartiles[1].tolist(), "q3": self.quartiles[2].tolist(),
                "z_outliers": self.z_outliers.tolist(), "iqr_outliers": self.iqr_outliers.tolist(),
                "saturation": self.saturation.tolist(), "saturated_neurons": np.nonzero(self.saturated)[0].tolist()}


def _edges(lo: float, hi: float, bins: int) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def distribution(
    store: ActivationStore, hook: str, *, bins: int = 64, z: float = 4.0, iqr: float = 1.5,
    bounds: Optional[tuple[float, float]] = None, tolerance: float = 0.01, quantile: float = 0.99,
    saturated_fraction: float = 0.5, max_elements: int = SAMPLE_ELEMENTS, sample: Optional[Sample] = None,
) -> Distribution:
    """Histograms, quartiles, outliers and saturation of `hook` over a bounded sample of rows."""
    check_hooks(store, hook)
    state = store.stats(hook)
    sample = sample if sample is not None and hook in sample.values else sample_rows(store, [hook], max_elements)
    x = sample.values[hook].astype(np.float64)
    edges = np.stack([_edges(state.minimum[i], state.maximum[i], bins) for i in range(state.width)])
    counts = np.stack([np.histogram(x[:, i], bins=edges[i])[0] for i in range(state.width)])
    pooled_edges = _edges(float(state.minimum.min()), float(state.maximum.max()), bins)
    pooled_counts = np.histogram(x, bins=pooled_edges)[0]
    quartiles = np.quantile(x, [0.25, 0.5, 0.75], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        zscores = np.abs(x - state.mean) / state.std
    z_out = np.nan_to_num(zscores, nan=0.0, posinf=np.inf) > z
    spread = quartiles[2] - quartiles[0]
    iqr_out = (x < quartiles[0] - iqr * spread) | (x > quartiles[2] + iqr * spread)
    if bounds is not None:
        lo, hi = float(bounds[0]), float(bounds[1])
        margin = tolerance * (hi - lo)
        saturation = ((x <= lo + margin) | (x >= hi - margin)).mean(axis=0)
        rule = {"kind": "bounds", "bounds": [lo, hi], "tolerance": tolerance}
    else:
        level = float(np.quantile(x, quantile))
        saturation = (x > level).mean(axis=0)
        rule = {"kind": "quantile", "quantile": quantile, "level": level}
    rule.update({"saturated_fraction": saturated_fraction, "z": z, "iqr": iqr, "bins": bins})
    return Distribution(hook, hook_layer(store, hook), len(sample.rows), sample.total_rows, edges, counts, pooled_edges,
                        pooled_counts, quartiles, z_out.sum(axis=0), iqr_out.sum(axis=0), saturation,
                        saturation > saturated_fraction, rule)


def layer_summary(table: NeuronTable, dist: Optional[Distribution] = None) -> dict[str, Any]:
    """One hook's line: pooled moments, dead and saturated counts, sparsity, outlier fractions."""
    s = table.state
    p = pooled(s)
    row: dict[str, Any] = {
        "hook_id": table.hook, "layer": table.layer, "width": table.width, "tokens": table.count,
        "mean": float(p.mean[0]), "std": float(p.std[0]), "skewness": float(p.skewness[0]), "kurtosis": float(p.kurtosis[0]),
        "min": float(p.minimum[0]), "max": float(p.maximum[0]),
        "frac_active": float(p.frac_active[0]), "dead_threshold": table.dead_threshold, "dead": int(table.dead.sum()),
        "participation_ratio_mean": float(np.nanmean(s.participation_ratio)) if np.isfinite(s.participation_ratio).any() else float("nan"),
        "l1_participation": l1_participation(s.abs_sum), "compression_potential": mass_share(s.abs_sum),
    }
    row["l1_participation_share"] = row["l1_participation"] / table.width
    if dist is not None:
        cells = dist.sample_rows * table.width
        row.update({"sample_rows": dist.sample_rows, "saturated": int(dist.saturated.sum()),
                    "z_outlier_fraction": float(dist.z_outliers.sum() / cells),
                    "iqr_outlier_fraction": float(dist.iqr_outliers.sum() / cells)})
    return row


def layer_summaries(
    store: ActivationStore, hooks: Optional[Sequence[str]] = None, dead_threshold: Optional[float] = None, **options: Any,
) -> list[dict[str, Any]]:
    """`layer_summary` of every hook (default: all), with the sampled distribution; JSON-ready."""
    return [layer_summary(neuron_table(store, h, dead_threshold), distribution(store, h, **options)) for h in check_hooks(store, hooks)]
