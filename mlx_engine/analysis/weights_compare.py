"""A sequence of checkpoints compared matrix by matrix, and where each statistic changes most.

For checkpoints 0..K-1 (training steps, fine-tunes, quantizations of one model), every
matrix present in all of them with one shape gets, per statistic of weights.py, its series
over the checkpoints, and the relative change of the weights themselves between
neighbours, ||W_k - W_{k-1}||_F / ||W_{k-1}||_F.

Change-point detection over each series (documented method, numpy only):
  - largest jump: k maximising |s_k - s_{k-1}|, the step between checkpoints k-1 and k;
  - single least-squares change point (the first step of binary segmentation; Hawkins
    1976, "Point estimation of the parameters of piecewise regression models"): the split
    k in 1..K-1 minimising the summed squared deviation of s[:k] and s[k:] from their own
    means, with the mean shift between the segments and the share of the series'
    variance the split explains (1 for a clean step). A series constant to CONSTANT_RTOL
    (float rounding of equal matrices) has no change point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..loading import ModelKit, load_model
from .common import AnalysisError, to_numpy
from .weights import BLAS_THREADS, STATISTICS, matrix_stats, weight_matrices

CONSTANT_RTOL = 1e-6  # float32 resolution: equal matrices rounded differently stay "constant"
COMPARE_STATISTICS = ("frobenius_norm", "spectral_norm", "stable_rank", "effective_rank", "std", "abs_max", "kurtosis")


@dataclass
class ChangePoint:
    """Where one series changes: its largest jump, and its single least-squares change point."""

    largest_jump_at: Optional[int]  # k: the step from checkpoint k-1 to k
    largest_jump: float
    split_at: Optional[int]  # segments [0, k) and [k, K)
    mean_shift: float  # mean of the second segment minus the first
    explained: float  # 1 - (within-segment SSE / total SSE)


def change_point(series: Sequence[float]) -> ChangePoint:
    """The change point of a series of at least two values (see the module docstring)."""
    s = np.asarray(series, dtype=np.float64)
    if s.size < 2:
        raise AnalysisError(f"a change point needs a series of at least two checkpoints, got {s.size}.")
    jumps = np.abs(np.diff(s))
    total = float(np.sum((s - s.mean()) ** 2))
    if np.ptp(s) <= CONSTANT_RTOL * float(np.abs(s).max()):
        return ChangePoint(None, 0.0, None, 0.0, 0.0)
    sse = np.array([np.sum((s[:k] - s[:k].mean()) ** 2) + np.sum((s[k:] - s[k:].mean()) ** 2) for k in range(1, s.size)])
    k = int(np.argmin(sse)) + 1
    return ChangePoint(int(np.argmax(jumps)) + 1, float(jumps.max()), k, float(s[k:].mean() - s[:k].mean()), float(1.0 - sse[k - 1] / total))


@dataclass
class CheckpointComparison:
    """Series [K] per (statistic, matrix), neighbour relative changes, and their change points."""

    checkpoints: list[str]
    matrices: list[str]
    statistics: list[str]
    series: dict[str, dict[str, list[float]]]  # statistic -> matrix -> [K]
    relative_change: dict[str, list[Optional[float]]]  # matrix -> [K], None at 0
    change_points: dict[str, dict[str, ChangePoint]] = field(default_factory=dict)  # matrix -> series name -> change point
    skipped: dict[str, str] = field(default_factory=dict)  # matrix -> why it is not compared

    def ranked(self, series: str = "relative_change") -> list[dict[str, Any]]:
        """Matrices by the size of their largest jump in `series` (a statistic or "relative_change")."""
        rows = [{"matrix": m, **asdict(cps[series])} for m, cps in self.change_points.items() if series in cps]
        return sorted(rows, key=lambda r: -r["largest_jump"])

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoints": self.checkpoints, "matrices": self.matrices, "statistics": self.statistics,
            "series": self.series, "relative_change": self.relative_change,
            "change_points": {m: {k: asdict(v) for k, v in cps.items()} for m, cps in self.change_points.items()},
            "skipped": self.skipped, "method": __doc__,
        }


def compare_checkpoints(
    models: Sequence[Union[str, Path, ModelKit]],
    *,
    statistics: Sequence[str] = COMPARE_STATISTICS,
    include: Optional[str] = None,
    progress: bool = True,
    blas_threads: Optional[int] = BLAS_THREADS,
) -> CheckpointComparison:
    """Compare 2 or more checkpoints in order; each is loaded (if a path) and released in turn.

    `blas_threads` caps numpy's BLAS threads during the statistics, as in weights.weight_report.
    """
    if len(models) < 2:
        raise AnalysisError(f"a comparison needs at least two checkpoints, got {len(models)}.")
    bad = [s for s in statistics if s not in STATISTICS]
    if bad:
        raise AnalysisError(f"unknown statistic(s) {bad}; valid: {', '.join(STATISTICS)}.")
    svd = any(s in ("spectral_norm", "stable_rank", "effective_rank") for s in statistics)
    names: list[str] = []
    per_checkpoint: list[dict[str, dict[str, float]]] = []
    changes: dict[str, list[Optional[float]]] = {}
    previous: dict[str, np.ndarray] = {}
    for k, model in enumerate(tqdm(models, desc="checkpoints", disable=not progress, leave=False)):
        kit = model if isinstance(model, ModelKit) else load_model(model)
        names.append(kit.model_id if isinstance(model, ModelKit) else str(model))
        values, current = {}, {}
        for name, kind, dense in weight_matrices(kit, include):
            w = to_numpy(dense)
            with threadpool_limits(limits=blas_threads, user_api="blas"):
                values[name] = matrix_stats(name, w, storage_kind=kind, svd=svd).values
            current[name] = w
            change = changes.setdefault(name, [None] * k)
            if name in previous and previous[name].shape == w.shape:
                base = float(np.linalg.norm(previous[name]))
                change.append(float(np.linalg.norm(w - previous[name]) / base) if base > 0 else float("inf"))
            else:
                change.append(None)
        per_checkpoint.append(values)
        previous = current
        del kit
    common = [n for n in per_checkpoint[0] if all(n in v for v in per_checkpoint)]
    skipped = {n: "not in every checkpoint" for n in changes if n not in common}
    kept = []
    for name in common:
        if any(c is None for c in changes[name][1:]):
            skipped[name] = "its shape changes between checkpoints"
        else:
            kept.append(name)
    if not kept:
        raise AnalysisError("the checkpoints have no weight matrix in common (same name and shape) to compare.")
    series = {s: {n: [v[n][s] for v in per_checkpoint] for n in kept} for s in statistics}
    comparison = CheckpointComparison(names, kept, list(statistics), series, {n: changes[n] for n in kept}, skipped=skipped)
    for name in kept:
        cps = {s: change_point(series[s][name]) for s in statistics}
        steps = [float(c) for c in changes[name][1:]]  # type: ignore[arg-type]
        jump_at = int(np.argmax(steps)) + 1
        cps["relative_change"] = ChangePoint(jump_at if max(steps) > 0 else None, float(max(steps)), None, 0.0, 0.0)
        comparison.change_points[name] = cps
    return comparison
