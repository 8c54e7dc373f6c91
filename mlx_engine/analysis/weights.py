"""Weight matrices described one by one: distribution, outliers, sparsity and singular values.

Every matrix a model multiplies by (Linear, Embedding, and each expert of a switch layer)
is read dense: quantized layers through mx.dequantize (common.dense_weight), so a 4-bit
model is described by the weights it computes with. Per matrix:
  - distribution: mean, std, min, max, |max|, skewness and excess kurtosis (scipy.stats);
  - outliers: entries more than OUTLIER_Z standard deviations from the mean, and the
    largest |z|;
  - sparsity: the fraction of exact zeros, and of entries within NEAR_ZERO x |max| of zero;
  - singular values (numpy.linalg.svd, float64); spectral and Frobenius norms;
    stable rank ||W||_F^2 / ||W||_2^2 (Rudelson & Vershynin 2007); effective rank
    exp(H(p)), p = sigma / sum(sigma), H the Shannon entropy (Roy & Vetterli 2007).
Checkpoint comparison and change-point detection are in weights_compare.py.

numpy's BLAS runs on BLAS_THREADS threads during the statistics (threadpoolctl): OpenBLAS's
spinning worker threads make SVDs 10-30 times slower on a machine whose cores are busy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

from ..loading import ModelKit
from .common import AnalysisError, dense_weight, split_layer, storage, to_numpy

BLAS_THREADS = 1
OUTLIER_Z = 6.0
NEAR_ZERO = 1e-3
STATISTICS = (
    "mean", "std", "min", "max", "abs_max", "skewness", "kurtosis", "outlier_fraction", "max_abs_z",
    "zero_fraction", "near_zero_fraction", "spectral_norm", "frobenius_norm", "stable_rank", "effective_rank",
)


@dataclass
class MatrixStats:
    """One matrix's statistics (see the module docstring); `singular_values` in descending order."""

    name: str
    layer: Optional[int]
    component: str
    shape: tuple[int, int]
    storage: str
    values: dict[str, float]
    singular_values: Optional[np.ndarray] = None

    def row(self) -> dict[str, Any]:
        """The table row: identity, shape, and every statistic."""
        return {"name": self.name, "layer": self.layer, "component": self.component, "rows": self.shape[0],
                "cols": self.shape[1], "storage": self.storage, **self.values}


def effective_rank(singular_values: np.ndarray) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the L1-normalised singular values."""
    s = np.asarray(singular_values, dtype=np.float64)
    return float(np.exp(stats.entropy(s))) if s.sum() > 0 else 0.0


def stable_rank(singular_values: np.ndarray) -> float:
    """||W||_F^2 / ||W||_2^2 = sum(sigma^2) / max(sigma)^2."""
    s = np.asarray(singular_values, dtype=np.float64)
    return float(np.sum(s**2) / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def matrix_stats(name: str, matrix: np.ndarray, *, storage_kind: str = "float32", svd: bool = True) -> MatrixStats:
    """Statistics of one 2-D matrix (float64 throughout)."""
    w = np.asarray(matrix, dtype=np.float64)
    if w.ndim != 2:
        raise AnalysisError(f"{name}: a matrix is 2-D, got shape {w.shape}.")
    flat = w.ravel()
    mean, std = float(flat.mean()), float(flat.std())
    abs_max = float(np.abs(flat).max())
    z = np.abs(flat - mean) / std if std > 0 else np.zeros_like(flat)
    values = {
        "mean": mean, "std": std, "min": float(flat.min()), "max": float(flat.max()), "abs_max": abs_max,
        "skewness": float(stats.skew(flat)) if std > 0 else 0.0,
        "kurtosis": float(stats.kurtosis(flat)) if std > 0 else 0.0,
        "outlier_fraction": float(np.mean(z > OUTLIER_Z)), "max_abs_z": float(z.max()),
        "zero_fraction": float(np.mean(flat == 0.0)),
        "near_zero_fraction": float(np.mean(np.abs(flat) <= NEAR_ZERO * abs_max)),
        "frobenius_norm": float(np.linalg.norm(w)),
    }
    s = None
    if svd:
        s = np.linalg.svd(w, compute_uv=False)
        values.update(spectral_norm=float(s[0]), stable_rank=stable_rank(s), effective_rank=effective_rank(s))
    layer, component = split_layer(name)
    return MatrixStats(name, layer, component, (int(w.shape[0]), int(w.shape[1])), storage_kind, values, s)


def weight_matrices(kit: ModelKit, include: Optional[str] = None) -> Iterator[tuple[str, str, mx.array]]:
    """(name, storage, dense float32 weight) of every matrix, experts split as `name[e]`; `include` filters names (regex)."""
    pattern = re.compile(include) if include else None
    for path, module in sorted(kit.model.named_modules(), key=lambda item: _natural(item[0])):
        if not isinstance(module, nn.Module) or "weight" not in module or module.weight.ndim < 2:
            continue
        dense = dense_weight(module)
        names = [path] if dense.ndim == 2 else [f"{path}[{e}]" for e in range(dense.shape[0])]
        for i, name in enumerate(names):
            if pattern is None or pattern.search(name):
                yield name, storage(module), dense if dense.ndim == 2 else dense[i]


def _natural(path: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


@dataclass
class WeightReport:
    """Every matrix's statistics, with the per-layer tables built from them."""

    model_id: str
    matrices: list[MatrixStats] = field(default_factory=list)

    def by_name(self) -> dict[str, MatrixStats]:
        return {m.name: m for m in self.matrices}

    def table(self) -> list[dict[str, Any]]:
        return [m.row() for m in self.matrices]

    def layer_table(self, statistic: str) -> dict[str, list[Optional[float]]]:
        """component -> per-layer value of `statistic` (experts of a layer averaged): the layer x component table."""
        if statistic not in STATISTICS:
            raise AnalysisError(f"unknown statistic {statistic!r}; valid: {', '.join(STATISTICS)}.")
        layers = sorted({m.layer for m in self.matrices if m.layer is not None})
        groups: dict[str, dict[int, list[float]]] = {}
        for m in self.matrices:
            if m.layer is None or statistic not in m.values:
                continue
            groups.setdefault(re.sub(r"\[\d+\]$", "", m.component), {}).setdefault(m.layer, []).append(m.values[statistic])
        return {comp: [float(np.mean(per[layer])) if layer in per else None for layer in layers] for comp, per in groups.items()}

    def to_json(self, spectra: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model_id, "outlier_z": OUTLIER_Z, "near_zero": NEAR_ZERO, "matrices": self.table()}
        if spectra:
            out["singular_values"] = {m.name: m.singular_values.tolist() for m in self.matrices if m.singular_values is not None}
        return out


def weight_report(
    kit: ModelKit, *, include: Optional[str] = None, svd: bool = True, blas_threads: Optional[int] = BLAS_THREADS
) -> WeightReport:
    """Statistics of every weight matrix of `kit` (those whose name matches `include`, a regex, if given).

    `blas_threads` caps numpy's BLAS threads meanwhile (None: the library's default).
    """
    report = WeightReport(kit.model_id)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for name, kind, dense in weight_matrices(kit, include):
            report.matrices.append(matrix_stats(name, to_numpy(dense), storage_kind=kind, svd=svd))
    if not report.matrices:
        raise AnalysisError(f"no weight matrix of {kit.model_id!r} matches {include!r}.")
    return report
