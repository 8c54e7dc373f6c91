"""Online per-neuron statistics that merge: moments, extremes, activity, and the top-k examples.

A `NeuronStats` state summarises the rows it has seen, one column per neuron, and two
states merge into the state of the union of their rows. So a batch is folded in as the
merge of the running state with the batch's own state, shards (and later ranks) merge
the same way, and no second pass over the store is ever needed.

Moments. Each batch's central moments are computed two-pass in float64 over the batch
alone (exact up to rounding), then merged with the pairwise update for M2 of Chan, Golub
and LeVeque ("Updating formulae and a pairwise algorithm for computing sample
variances", 1979) extended to M3 and M4 by Pébay ("Formulas for robust, one-pass
parallel computation of covariances and arbitrary-order statistical moments", Sandia
SAND2008-6212, 2008; eqs. 2.1-2.3, as Terriberry 2007 and Welford's 1962 running
update in its one-row case). Merging central moments never subtracts large raw sums,
so a column with mean 1e4 and spread 1e-2 keeps its digits.

Definitions (n rows, population moments, as numpy's and scipy's defaults with bias):
  variance      = M2 / n                                  (np.var, ddof=0)
  skewness      = sqrt(n) * M3 / M2**1.5                  (scipy.stats.skew, bias=True)
  kurtosis      = n * M4 / M2**2 - 3                      (scipy.stats.kurtosis, fisher=True, bias=True)
  frac_active   = #(x > threshold) / n                    (threshold 0 by default)
  participation = (sum |x|)**2 / (n * sum x**2)           per neuron, over the n tokens: 1 when
                  every token carries the same magnitude, about m/n when m tokens carry it all.
Top-k: the k largest values per neuron with their (document, position); ties go to the
earlier (document, position), so the result is one total order and merges exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np

BLOCK_ELEMENTS = 1 << 20  # elements per column block of a batch (see NeuronStats.of)
STATE_FIELDS = ("count", "mean", "m2", "m3", "m4", "minimum", "maximum", "above", "abs_sum", "top_values", "top_doc", "top_pos")


@dataclass
class NeuronStats:
    """The mergeable state of `width` neurons (see the module docstring for every definition)."""

    width: int
    k: int
    threshold: float
    count: int
    mean: np.ndarray
    m2: np.ndarray
    m3: np.ndarray
    m4: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    above: np.ndarray  # int64: rows with x > threshold
    abs_sum: np.ndarray
    top_values: np.ndarray  # [k, width], descending; -inf where fewer than k rows were seen
    top_doc: np.ndarray  # [k, width] int64; -1 where empty
    top_pos: np.ndarray  # [k, width] int64; -1 where empty

    @classmethod
    def empty(cls, width: int, k: int = 20, threshold: float = 0.0) -> "NeuronStats":
        zeros = np.zeros(width)
        return cls(
            width, k, float(threshold), 0, zeros.copy(), zeros.copy(), zeros.copy(), zeros.copy(),
            np.full(width, np.inf), np.full(width, -np.inf), np.zeros(width, np.int64), zeros.copy(),
            np.full((k, width), -np.inf), np.full((k, width), -1, np.int64), np.full((k, width), -1, np.int64),
        )

    @classmethod
    def of(
        cls, x: np.ndarray, doc: np.ndarray, pos: np.ndarray, k: int = 20, threshold: float = 0.0,
        floor: Optional[tuple[np.ndarray, np.ndarray]] = None,
    ) -> "NeuronStats":
        """The state of rows x [n, width] (any float dtype; computed in float64).

        `floor` (see `update`) only spares work: the top-k it returns may differ from
        the rows' own in columns where the merged result cannot.
        """
        n, width = x.shape
        state = cls.empty(width, k, threshold)
        if n == 0:
            return state
        doc, pos = np.asarray(doc, np.int64), np.asarray(pos, np.int64)
        state.count = n
        top = [np.empty((min(k, n), width), dt) for dt in (np.float64, np.int64, np.int64)]
        step = max(1, BLOCK_ELEMENTS // n)
        # Column blocks, transposed: reductions run along contiguous memory (numpy's pairwise
        # summation) and the temporaries stay small; ~4x faster than whole-array axis-0 passes.
        for c in range(0, width, step):
            cols = slice(c, c + step)
            block = _transposed(x, cols)  # [cols, n] float64
            mean = block.mean(axis=1)
            d = block - mean[:, None]
            p = d * d
            state.mean[cols], state.m2[cols] = mean, p.sum(axis=1)
            p *= d
            state.m3[cols] = p.sum(axis=1)
            p *= d
            state.m4[cols] = p.sum(axis=1)
            state.minimum[cols], state.maximum[cols] = block.min(axis=1), block.max(axis=1)
            state.above[cols] = (block > threshold).sum(axis=1)
            state.abs_sum[cols] = np.abs(block).sum(axis=1)
            block_floor = None if floor is None else (floor[0][cols], floor[1][cols])
            for out, part in zip(top, _top_of(block, doc, pos, k, block_floor)):
                out[:, cols] = part.T
        state.top_values, state.top_doc, state.top_pos = _sorted_top(top[0], top[1], top[2], k)
        return state
        mean = x.mean(axis=0)
        d = x - mean
        d2 = d * d
        state.count, state.mean = n, mean
        state.m2, state.m3, state.m4 = d2.sum(axis=0), (d2 * d).sum(axis=0), (d2 * d2).sum(axis=0)
        state.minimum, state.maximum = x.min(axis=0), x.max(axis=0)
        state.above = (x > threshold).sum(axis=0).astype(np.int64)
        state.abs_sum = np.abs(x).sum(axis=0)
        state.top_values, state.top_doc, state.top_pos = _top_of(x, np.asarray(doc, np.int64), np.asarray(pos, np.int64), k, floor)
        return state

    def update(self, x: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> None:
        """Fold rows in (in place): the merge with their own state.

        Where this state already holds k examples, a value below its k-th can never
        enter, nor one equal to it from a later (doc, pos): the rows' ties there need no sort.
        """
        floor = None
        if self.count >= self.k and np.isfinite(self.top_values[-1]).all():
            kth = self.top_values[-1]
            tied = self.top_values == kth
            keys = np.where(tied, _key(self.top_doc, self.top_pos), -1).max(axis=0)
            floor = (kth, keys)
        self.merge_in(NeuronStats.of(x, doc, pos, self.k, self.threshold, floor))

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """The state of both states' rows together (neither is changed)."""
        out = self.copy()
        out.merge_in(other)
        return out

    def merge_in(self, other: "NeuronStats") -> None:
        if (other.width, other.k, other.threshold) != (self.width, self.k, self.threshold):
            raise ValueError(
                f"cannot merge statistics of width/k/threshold {(other.width, other.k, other.threshold)} "
                f"into {(self.width, self.k, self.threshold)}"
            )
        if other.count == 0:
            return
        if self.count == 0:
            for f in STATE_FIELDS:
                setattr(self, f, _copy(getattr(other, f)))
            return
        na, nb = float(self.count), float(other.count)
        n = na + nb
        delta = other.mean - self.mean
        d2 = delta * delta
        m2a, m2b, m3a, m3b = self.m2, other.m2, self.m3, other.m3
        self.m4 = (
            self.m4 + other.m4 + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6.0 * d2 * (na * na * m2b + nb * nb * m2a) / n**2 + 4.0 * delta * (na * m3b - nb * m3a) / n
        )
        self.m3 = m3a + m3b + d2 * delta * na * nb * (na - nb) / n**2 + 3.0 * delta * (na * m2b - nb * m2a) / n
        self.m2 = m2a + m2b + d2 * na * nb / n
        self.mean = self.mean + delta * (nb / n)
        self.count += other.count
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        self.above = self.above + other.above
        self.abs_sum = self.abs_sum + other.abs_sum
        self.top_values, self.top_doc, self.top_pos = _top_merge(
            (self.top_values, self.top_doc, self.top_pos), (other.top_values, other.top_doc, other.top_pos), self.k
        )

    def copy(self) -> "NeuronStats":
        return NeuronStats(**{f.name: _copy(getattr(self, f.name)) for f in fields(self)})

    # Derived statistics (population definitions; see the module docstring).
    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count if self.count else np.full(self.width, np.nan)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.variance)

    @property
    def skewness(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(self.count) * self.m3 / self.m2**1.5

    @property
    def kurtosis(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.count * self.m4 / self.m2**2 - 3.0

    @property
    def frac_active(self) -> np.ndarray:
        return self.above / self.count if self.count else np.full(self.width, np.nan)

    @property
    def participation_ratio(self) -> np.ndarray:
        sum_sq = self.m2 + self.count * self.mean**2
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.abs_sum**2 / (self.count * sum_sq)

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The state as named arrays (what an .npz holds), config included."""
        out = {f"{prefix}{f}": np.asarray(getattr(self, f)) for f in STATE_FIELDS}
        out[f"{prefix}k"], out[f"{prefix}threshold"] = np.asarray(self.k), np.asarray(self.threshold)
        return out

    def summary_arrays(self) -> dict[str, np.ndarray]:
        """State plus the derived per-neuron statistics, for stats/{hook}.npz."""
        derived = {
            "variance": self.variance, "std": self.std, "skewness": self.skewness, "kurtosis": self.kurtosis,
            "frac_active": self.frac_active, "participation_ratio": self.participation_ratio,
        }
        return {**self.arrays(), **derived}

    @classmethod
    def from_arrays(cls, arrays: "np.lib.npyio.NpzFile | dict[str, np.ndarray]", prefix: str = "") -> "NeuronStats":
        values = {f: np.asarray(arrays[f"{prefix}{f}"]) for f in STATE_FIELDS}
        width = int(values["mean"].shape[0])
        return cls(
            width=width, k=int(arrays[f"{prefix}k"]), threshold=float(arrays[f"{prefix}threshold"]),
            **{**values, "count": int(values["count"])},
        )

    @classmethod
    def load(cls, path: Union[str, Path]) -> "NeuronStats":
        with np.load(path) as z:
            return cls.from_arrays(z)


def _copy(value: Union[np.ndarray, int, float]) -> Union[np.ndarray, int, float]:
    return value.copy() if isinstance(value, np.ndarray) else value


def _top_merge(
    a: tuple[np.ndarray, np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k first of both lists per column, by (value desc, doc asc, pos asc)."""
    values, doc, pos = (np.concatenate([x, y], axis=0) for x, y in zip(a, b))
    return _sorted_top(values, doc, pos, k)


def _sorted_top(values: np.ndarray, doc: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((pos, doc, -values), axis=0)[:k]
    top = [np.take_along_axis(x, order, axis=0) for x in (values, doc, pos)]
    if top[0].shape[0] < k:  # fewer candidates than k: pad
        pad = k - top[0].shape[0]
        top = [np.concatenate([x, np.full((pad, x.shape[1]), fill, x.dtype)]) for x, fill in zip(top, (-np.inf, -1, -1))]
    empty = top[0] == -np.inf
    top[1][empty], top[2][empty] = -1, -1
    return top[0], top[1], top[2]


def _transposed(x: np.ndarray, cols: slice) -> np.ndarray:
    """x[:, cols].T as contiguous float64, copied 256 rows at a time (a strided copy of the
    whole block at once misses the cache on every element)."""
    n = x.shape[0]
    block = x[:, cols]
    out = np.empty((block.shape[1], n), np.float64)
    for r in range(0, n, 256):
        out[:, r : r + 256] = block[r : r + 256].T
    return out


def _key(doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(doc, pos) as one sortable int64 (documents < 2**31, positions < 2**32)."""
    return doc.astype(np.int64) * (1 << 32) + pos.astype(np.int64)


def _top_of(
    xt: np.ndarray, doc: np.ndarray, pos: np.ndarray, k: int, floor: Optional[tuple[np.ndarray, np.ndarray]] = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k candidates [columns, k] of xt [columns, n] (one row per neuron; doc, pos [n]), unsorted.

    argpartition finds k candidates per column in O(n); only a column where the k-th
    value is tied beyond the candidates needs the full order, to pick the earliest ties,
    and not even then when `floor` (the running k-th value and the latest key tied at
    it) shows that those ties lose to what the running state holds.
    """
    width, n = xt.shape
    kk = min(k, n)
    if kk < n:
        rows = np.argpartition(-xt, kk - 1, axis=1)[:, :kk]
        chosen = np.take_along_axis(xt, rows, axis=1)
        kth = chosen.min(axis=1)
        tied = (xt == kth[:, None]).sum(axis=1) > (chosen == kth[:, None]).sum(axis=1)
        if floor is not None:
            first = _key(doc, pos).min()
            tied &= (kth > floor[0]) | ((kth == floor[0]) & (first < floor[1]))
        for col in np.nonzero(tied)[0]:
            rows[col] = np.lexsort((pos, doc, -xt[col]))[:kk]
    else:
        rows = np.broadcast_to(np.arange(n), (width, n))
    return np.take_along_axis(xt, rows, axis=1), doc[rows], pos[rows]


def brute_force_top(x: np.ndarray, doc: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference top-k: a full sort of every column (what the tests compare against)."""
    x = np.asarray(x, np.float64)
    docs = np.broadcast_to(np.asarray(doc, np.int64)[:, None], x.shape)
    poss = np.broadcast_to(np.asarray(pos, np.int64)[:, None], x.shape)
    return _sorted_top(x, np.array(docs), np.array(poss), k)


def sparsity_row(hook_id: str, layer: Optional[int], component: str, state: NeuronStats) -> dict[str, object]:
    """One line of sparsity.csv: a hook's activity summarised over its neurons."""
    pr = state.participation_ratio
    frac = state.frac_active
    return {
        "hook_id": hook_id, "layer": "" if layer is None else layer, "component": component, "width": state.width,
        "tokens": state.count, "threshold": state.threshold,
        "frac_active_mean": float(np.mean(frac)), "dead_neurons": int(np.sum(state.above == 0)),
        "participation_ratio_mean": float(np.nanmean(pr)) if np.isfinite(pr).any() else float("nan"),
        "participation_ratio_median": float(np.nanmedian(pr)) if np.isfinite(pr).any() else float("nan"),
    }
