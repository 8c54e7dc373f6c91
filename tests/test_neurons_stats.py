"""Per-neuron and per-layer statistics of a store, each equal to numpy / scipy on the same rows.

The store: a tiny Llama over short lines of source (three shards), every layer's mlp_post and one
residual stream. The sample is the whole store here (it is small), so the distribution measures
are compared exactly; a bounded sample is checked for its bound and its even spacing.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
import scipy.stats

from mlx_engine.analysis.neurons.common import NeuronError, check_neurons, sample_rows
from mlx_engine.analysis.neurons.stats import distribution, l1_participation, layer_summaries, mass_share, neuron_table

HOOKS = ["layers.0.mlp_post", "layers.1.mlp_post", "layers.2.mlp_post", "layers.1.residual"]


def corpus_lines() -> list[str]:
    return [line for line in inspect.getsource(textwrap).splitlines() if line.strip()][:90]


@pytest.fixture(scope="module")
def store(llama_kit, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("neuron_stats")
    corpus = folder / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "task": ("code", "prose", "mixed")[i % 3]}) + "\n"
                              for i, t in enumerate(corpus_lines())), encoding="utf-8")
    return mlx_engine.extract(llama_kit, corpus, HOOKS, folder / "store", context_size=32, batch_size=4, shard_tokens=400,
                              top_k=6, progress=False)


def test_moments_and_activity_equal_scipy(store) -> None:
    for hook in HOOKS:
        x = np.asarray(store.rows(hook)).astype(np.float64)
        t = neuron_table(store, hook)
        c = t.columns()
        np.testing.assert_allclose(c["mean"], x.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(c["std"], x.std(axis=0), rtol=1e-9)
        np.testing.assert_allclose(c["skewness"], scipy.stats.skew(x, axis=0, bias=True), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(c["kurtosis"], scipy.stats.kurtosis(x, axis=0, fisher=True, bias=True), rtol=1e-7, atol=1e-9)
        assert np.array_equal(c["min"], x.min(axis=0)) and np.array_equal(c["max"], x.max(axis=0))
        np.testing.assert_allclose(c["frac_active"], (x > 0).mean(axis=0))
        np.testing.assert_allclose(c["mean_abs"], np.abs(x).mean(axis=0), rtol=1e-9)
        assert np.array_equal(c["dead"], ~(x > 0).any(axis=0))
        high = neuron_table(store, hook, dead_threshold=1.0)  # any threshold at or above the store's, from the online max
        assert np.array_equal(high.dead, ~(x > 1.0).any(axis=0))


def test_layer_summary_pools_every_value(store) -> None:
    for summary in layer_summaries(store):
        x = np.asarray(store.rows(summary["hook_id"])).astype(np.float64)
        flat = x.reshape(-1)
        assert summary["tokens"] == len(x) and summary["width"] == x.shape[1]
        assert summary["mean"] == pytest.approx(flat.mean(), abs=1e-10)
        assert summary["std"] == pytest.approx(flat.std(), rel=1e-9)
        assert summary["skewness"] == pytest.approx(scipy.stats.skew(flat), rel=1e-6, abs=1e-9)
        assert summary["kurtosis"] == pytest.approx(scipy.stats.kurtosis(flat), rel=1e-6, abs=1e-9)
        assert (summary["min"], summary["max"]) == (flat.min(), flat.max())
        assert summary["frac_active"] == pytest.approx((flat > 0).mean())
        mass = np.abs(x).sum(axis=0)
        assert summary["l1_participation"] == pytest.approx(mass.sum() ** 2 / (mass**2).sum())
        share = next(k for k in range(1, len(mass) + 1) if np.sort(mass)[::-1][:k].sum() >= 0.9 * mass.sum()) / len(mass)
        assert summary["compression_potential"] == pytest.approx(share)
        assert summary["dead"] == int((x.max(axis=0) <= 0).sum())
        z = np.abs(scipy.stats.zscore(x, axis=0)) > 4
        assert summary["z_outlier_fraction"] == pytest.approx(z.mean())


def test_distribution_equals_numpy_on_the_rows(store) -> None:
    hook = "layers.1.mlp_post"
    x = np.asarray(store.rows(hook)).astype(np.float64)
    d = distribution(store, hook, bins=32)
    assert d.sample_rows == d.total_rows == len(x)
    for i in (0, 5, 77):
        counts, edges = np.histogram(x[:, i], bins=32, range=(x[:, i].min(), x[:, i].max()))
        np.testing.assert_allclose(d.edges[i], edges)
        assert np.array_equal(d.counts[i], counts) and counts.sum() == len(x)
    assert np.array_equal(d.pooled_counts, np.histogram(x, bins=32, range=(x.min(), x.max()))[0])
    np.testing.assert_allclose(d.quartiles, np.percentile(x, [25, 50, 75], axis=0))
    q1, q3 = np.percentile(x, 25, axis=0), np.percentile(x, 75, axis=0)
    iqr = scipy.stats.iqr(x, axis=0)
    assert np.array_equal(d.iqr_outliers, ((x < q1 - 1.5 * iqr) | (x > q3 + 1.5 * iqr)).sum(axis=0))
    assert np.array_equal(d.z_outliers, (np.abs(scipy.stats.zscore(x, axis=0)) > 4).sum(axis=0))
    level = np.quantile(x, 0.9)
    by_quantile = distribution(store, hook, quantile=0.9, saturated_fraction=0.3)
    np.testing.assert_allclose(by_quantile.saturation, (x > level).mean(axis=0))
    assert np.array_equal(by_quantile.saturated, (x > level).mean(axis=0) > 0.3)
    by_bounds = distribution(store, hook, bounds=(-2.0, 2.0), tolerance=0.1, saturated_fraction=0.05)
    near = (x <= -2.0 + 0.4) | (x >= 2.0 - 0.4)
    np.testing.assert_allclose(by_bounds.saturation, near.mean(axis=0))
    assert np.array_equal(by_bounds.saturated, near.mean(axis=0) > 0.05)
    json.dumps(d.to_json())


def test_a_bounded_sample_is_bounded_and_evenly_spaced(store) -> None:
    width = store.hook_info("layers.1.residual")["width"]
    sample = sample_rows(store, ["layers.1.residual"], max_elements=width * 100)
    assert len(sample.rows) == 100 and not sample.exact
    assert np.array_equal(sample.rows, np.linspace(0, store.num_tokens - 1, 100).round().astype(np.int64))
    np.testing.assert_array_equal(sample.values["layers.1.residual"], np.asarray(store.rows("layers.1.residual"))[sample.rows])
    d = distribution(store, "layers.1.residual", max_elements=width * 100)
    assert d.sample_rows == 100 and d.counts.sum(axis=1).tolist() == [100] * width


def test_sparsity_helpers_on_known_masses() -> None:
    assert l1_participation(np.array([1.0, 0, 0, 0])) == 1.0
    assert l1_participation(np.ones(8)) == pytest.approx(8.0)
    assert mass_share(np.array([9.0, 1.0, 0.0, 0.0])) == 0.25  # 9 of 10 in one neuron of four
    assert mass_share(np.ones(10)) == pytest.approx(0.9)


def test_bad_requests_say_what_is_wrong(store) -> None:
    with pytest.raises(NeuronError, match=r"hook 'layers.2.residual' is not in the store .* it holds layers.0.mlp_post"):
        neuron_table(store, "layers.2.residual")
    with pytest.raises(NeuronError, match=r"neuron 128 is out of range: layers.0.mlp_post has 128 neurons \(0..127\)"):
        check_neurons(store, "layers.0.mlp_post", [3, 128])
    with pytest.raises(NeuronError, match="not an activation store"):
        from mlx_engine.analysis.neurons.common import open_store

        open_store(Path(store.path).parent)
