"""Online statistics (mlx_engine/store/stats.py) against numpy and scipy on the same rows.

Tolerances: count, min, max, fraction active and the top-k (values, documents,
positions) are exact; mean and variance agree to 1e-12 relative, skewness and kurtosis
to 1e-9 absolute, merged states equal the whole-data state to 1e-12 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from mlx_engine.store.stats import NeuronStats, brute_force_top


def rows(seed: int = 0, n: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heavy tails, a large offset, integer ties, a dead column and a ReLU-like column."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(5, size=(n, 12))
    x[:, 1] = 1e4 + 1e-2 * rng.normal(size=n)  # catastrophic for raw power sums
    x[:, 2:5] = np.round(rng.normal(size=(n, 3)))  # ties everywhere, also at the k-th value
    x[:, 5] = 0.0  # a dead neuron: every value tied
    x[:, 6] = np.maximum(rng.normal(size=n), 0.0)
    x[:, 7] = rng.exponential(size=n) ** 2  # strongly skewed
    doc = np.repeat(np.arange(n // 30), 30)
    pos = np.tile(np.arange(30), n // 30)
    return x, doc, pos


def streamed(x: np.ndarray, doc: np.ndarray, pos: np.ndarray, sizes: list[int], k: int = 9) -> NeuronStats:
    state = NeuronStats.empty(x.shape[1], k=k)
    start = 0
    for size in sizes:
        state.update(x[start : start + size], doc[start : start + size], pos[start : start + size])
        start += size
    assert start == len(x)
    return state


def test_streamed_moments_equal_numpy_and_scipy() -> None:
    x, doc, pos = rows()
    state = streamed(x, doc, pos, [1, 2, 97, 400, 1, 1499, 1000])
    assert state.count == len(x)
    np.testing.assert_allclose(state.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.variance, x.var(axis=0), rtol=1e-12, atol=1e-300)
    live = [c for c in range(x.shape[1]) if c != 5]  # column 5 has zero variance: skew/kurtosis undefined (nan)
    skew = scipy.stats.skew(x[:, live], axis=0, bias=True)
    kurt = scipy.stats.kurtosis(x[:, live], axis=0, fisher=True, bias=True)
    # Column 1 (mean 1e4, spread 1e-2) holds only ~11 significant digits of its spread, in any algorithm.
    tolerance = np.where(np.array(live) == 1, 1e-6, 1e-9)
    assert (np.abs(state.skewness[live] - skew) <= tolerance).all()
    assert (np.abs(state.kurtosis[live] - kurt) <= tolerance).all()
    assert np.isnan(state.skewness[5]) and np.isnan(state.kurtosis[5])
    assert np.array_equal(state.minimum, x.min(axis=0)) and np.array_equal(state.maximum, x.max(axis=0))
    assert np.array_equal(state.above, (x > 0).sum(axis=0))
    np.testing.assert_array_equal(state.frac_active, (x > 0).mean(axis=0))
    with np.errstate(invalid="ignore"):
        pr = np.abs(x).sum(axis=0) ** 2 / (len(x) * (x**2).sum(axis=0))
    np.testing.assert_allclose(state.participation_ratio[live], pr[live], rtol=1e-12)


def test_top_k_equals_a_brute_force_sort_ties_included() -> None:
    x, doc, pos = rows(seed=1)
    state = streamed(x, doc, pos, [5, 700, 3, 1292, 1000], k=9)
    values, docs, poss = brute_force_top(x, doc, pos, 9)
    assert np.array_equal(state.top_values, values)
    assert np.array_equal(state.top_doc, docs) and np.array_equal(state.top_pos, poss)
    # The dead column keeps its nine earliest rows; a tied column keeps the earliest of its ties.
    assert state.top_doc[:, 5].tolist() == [0] * 9 and state.top_pos[:, 5].tolist() == list(range(9))


def test_fewer_rows_than_k_pads_with_empty_slots() -> None:
    x, doc, pos = rows(n=60)
    state = streamed(x[:4], doc[:4], pos[:4], [4], k=9)
    assert np.isneginf(state.top_values[4:]).all() and (state.top_doc[4:] == -1).all()
    values, docs, _ = brute_force_top(x[:4], doc[:4], pos[:4], 9)
    assert np.array_equal(state.top_values, values) and np.array_equal(state.top_doc, docs)


@pytest.mark.parametrize("cuts", [[1500], [1, 2999], [700, 1400, 2100, 2800]])
def test_merged_states_equal_the_whole_data_state(cuts: list[int]) -> None:
    """Shards (and later ranks) merge: any split, merged in any grouping, gives the whole-data state."""
    x, doc, pos = rows(seed=2)
    whole = NeuronStats.of(x, doc, pos, k=9)
    bounds = [0, *cuts, len(x)]
    parts = [NeuronStats.of(x[a:b], doc[a:b], pos[a:b], k=9) for a, b in zip(bounds, bounds[1:])]
    left_to_right = parts[0]
    for part in parts[1:]:
        left_to_right = left_to_right.merge(part)
    right_first = parts[-1]
    for part in reversed(parts[:-1]):
        right_first = part.merge(right_first)
    for merged in (left_to_right, right_first):
        assert merged.count == whole.count
        for name in ("mean", "m2", "m3", "m4", "abs_sum"):
            np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-9, err_msg=name)
        for name in ("minimum", "maximum", "above", "top_values", "top_doc", "top_pos"):
            assert np.array_equal(getattr(merged, name), getattr(whole, name)), name


def test_merge_refuses_states_of_another_shape() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        NeuronStats.empty(4, k=3).merge(NeuronStats.empty(5, k=3))


def test_a_saved_state_loads_back_bit_for_bit(tmp_path) -> None:
    x, doc, pos = rows(seed=3)
    state = streamed(x, doc, pos, [1000, 2000])
    np.savez(tmp_path / "s.npz", **state.arrays())
    back = NeuronStats.load(tmp_path / "s.npz")
    for name in ("count", "k", "threshold", "mean", "m2", "m3", "m4", "minimum", "maximum", "above", "abs_sum", "top_values", "top_doc", "top_pos"):
        assert np.array_equal(getattr(back, name), getattr(state, name)), name
    # Continuing from the loaded state equals continuing from the live one (what a resume relies on).
    more = rows(seed=4, n=300)
    back.update(more[0], more[1] + 100, more[2])
    state.update(more[0], more[1] + 100, more[2])
    assert np.array_equal(back.m4, state.m4) and np.array_equal(back.top_doc, state.top_doc)
