"""Clustering, projections, CKA, polysemanticity, specialization, the PMI graph and store comparison, each against
an independent computation: scikit-learn called directly on the same rows, planted clusters, the kernel (HSIC)
form of CKA, brute-force PMI, hand-made specialization counts and a graph whose modularity is known by hand."""

from __future__ import annotations

import inspect
import json
import textwrap

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import networkx as nx
import numpy as np
import pytest
import scipy.stats
from sklearn.cluster import DBSCAN, AgglomerativeClustering, KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from mlx_engine.analysis.neurons.clustering import cluster_columns, cluster_neurons
from mlx_engine.analysis.neurons.common import NeuronError
from mlx_engine.analysis.neurons.compare import compare_stores
from mlx_engine.analysis.neurons.polysemantic import polysemanticity
from mlx_engine.analysis.neurons.projections import cka_matrix, linear_cka, neuron_correlation, pca_spectrum, project_positions
from mlx_engine.analysis.neurons.specialization import (Specialization, communities, pmi_graph, specialization,
                                                        specialization_of_stores, task_labels)

HOOKS = ["layers.0.mlp_post", "layers.1.residual", "layers.2.residual"]
TASKS = ("code", "prose")


def lines() -> list[str]:
    return [line for line in inspect.getsource(textwrap).splitlines() if line.strip()][:60]


@pytest.fixture(scope="module")
def stores(llama_kit, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("neuron_population")
    corpus = folder / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "task": TASKS[i % 2]}) + "\n" for i, t in enumerate(lines())), encoding="utf-8")
    opts = dict(context_size=24, batch_size=4, shard_tokens=250, top_k=6, progress=False)
    out = {"all": mlx_engine.extract(llama_kit, corpus, HOOKS, folder / "all", **opts)}
    for k, task in enumerate(TASKS):
        out[task] = mlx_engine.extract(llama_kit, lines()[k::2], HOOKS, folder / task, **opts)
    return out


def planted_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """400 tokens x 16 neurons in three groups (5, 7, 4), each group driven by its own latent signal plus noise."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([0, 1, 2], [5, 7, 4])
    latent = rng.normal(size=(400, 3))
    return latent[:, groups] * rng.uniform(0.5, 2.0, 16) + 0.3 * rng.normal(size=(400, 16)), groups


def test_clusters_equal_scikit_learn_and_recover_the_planted_groups() -> None:
    x, groups = planted_clusters()
    corr = np.corrcoef(x, rowvar=False)
    direct = {
        "kmeans": KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(corr),
        "agglomerative": AgglomerativeClustering(n_clusters=3, metric="precomputed", linkage="average").fit_predict(1 - corr),
        "dbscan": DBSCAN(eps=0.5, min_samples=3, metric="precomputed").fit_predict(np.clip(1 - corr, 0, 2)),
    }
    for method, want in direct.items():
        labels, matrix = cluster_columns(x, method, n_clusters=3, eps=0.5, min_samples=3)
        np.testing.assert_allclose(matrix, corr)
        assert np.array_equal(labels, want), method
        assert adjusted_rand_score(groups, labels) == 1.0, method


def test_store_clusters_are_the_clusters_of_its_rows(stores) -> None:
    store = stores["all"]
    x = np.asarray(store.rows("layers.0.mlp_post"))
    got = cluster_neurons(store, ["layers.0.mlp_post"], "agglomerative", n_clusters=5)
    want, _ = cluster_columns(x, "agglomerative", n_clusters=5)
    assert np.array_equal(got.labels, want) and sum(c["size"] for c in got.clusters()) == 128
    assert got.silhouette is not None and -1 <= got.silhouette <= 1
    json.dumps(got.to_json())
    with pytest.raises(NeuronError, match="unknown clustering method 'spectral'"):
        cluster_columns(x, "spectral")


def test_pca_variance_equals_the_singular_values(stores) -> None:
    x = np.asarray(stores["all"].rows("layers.1.residual")).astype(np.float64)
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    ratio = s**2 / (s**2).sum()
    spectrum = pca_spectrum(x, components=10)
    np.testing.assert_allclose(spectrum["explained_variance_ratio"], ratio[:10], rtol=1e-8)
    eig = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    assert spectrum["participation_ratio"] == pytest.approx(eig.sum() ** 2 / (eig**2).sum(), rel=1e-8)
    assert spectrum["components_for_90"] == int(np.argmax(np.cumsum(ratio) >= 0.9)) + 1
    proj = project_positions(stores["all"], ["layers.1.residual"], "pca", points=10_000, neuron=3)
    want = PCA(n_components=2).fit_transform(x)
    np.testing.assert_allclose(np.abs(proj.coords), np.abs(want), rtol=1e-6, atol=1e-8)  # components up to sign
    np.testing.assert_allclose(proj.info["explained_variance_ratio"], ratio[:2], rtol=1e-8)
    np.testing.assert_allclose(proj.value, x[:, 3])
    both = project_positions(stores["all"], ["layers.1.residual", "layers.2.residual"], "tsne", points=120)
    assert both.coords.shape == (120, 2) and sorted(set(both.layer)) == [1, 2] and len(set(both.token)) > 5
    with pytest.raises(NeuronError, match="need one width"):
        project_positions(stores["all"], ["layers.0.mlp_post", "layers.1.residual"])


def hsic_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from its kernel definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, H = I - 11^T/n."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, lk = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, lk) / np.sqrt(hsic(k, k) * hsic(lk, lk))


def test_linear_cka_equals_its_kernel_form(stores) -> None:
    store = stores["all"]
    rows = {h: np.asarray(store.rows(h)).astype(np.float64)[:300] for h in HOOKS}
    for a, b in (("layers.0.mlp_post", "layers.1.residual"), ("layers.1.residual", "layers.2.residual")):
        assert linear_cka(rows[a], rows[b]) == pytest.approx(hsic_cka(rows[a], rows[b]), rel=1e-9)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(64, 64)))
    assert linear_cka(rows["layers.1.residual"], 3.0 * rows["layers.1.residual"] @ q) == pytest.approx(1.0)
    full = {h: np.asarray(store.rows(h)) for h in HOOKS}
    m = np.array(cka_matrix(store, HOOKS)["cka"])
    assert m[0, 2] == pytest.approx(linear_cka(full[HOOKS[0]], full[HOOKS[2]])) and np.allclose(np.diag(m), 1)


def test_neuron_correlations_equal_scipy(stores) -> None:
    store = stores["all"]
    a, b = np.asarray(store.rows("layers.1.residual")), np.asarray(store.rows("layers.2.residual"))
    for method, reference in (("pearson", scipy.stats.pearsonr), ("spearman", scipy.stats.spearmanr)):
        got = neuron_correlation(store, "layers.1.residual", "layers.2.residual", method, top=5, with_matrix=True)
        for p in got["top_pairs"]:
            assert p["r"] == pytest.approx(reference(a[:, p["neuron_a"]], b[:, p["neuron_b"]]).statistic, rel=1e-6)
        r = np.array(got["r"])
        assert abs(got["top_pairs"][0]["r"]) == pytest.approx(np.abs(r).max())


def test_polysemanticity_clusters_each_neurons_top_contexts(stores) -> None:
    store = stores["all"]
    x = np.asarray(store.rows("layers.0.mlp_post")).astype(np.float64)
    tokens = np.asarray(store.tokens())
    state = store.stats("layers.0.mlp_post")
    ranked = polysemanticity(store, "layers.0.mlp_post", distance=0.5)
    assert len(ranked) == 128 and [r["rank"] for r in ranked] == list(range(128))
    assert all((a["clusters"], a["token_entropy"]) >= (b["clusters"], b["token_entropy"]) for a, b in zip(ranked, ranked[1:]))
    for r in ranked[:2] + ranked[-2:]:
        rows = [store.row_of(int(d), int(p)) for d, p in zip(state.top_doc[:, r["neuron"]], state.top_pos[:, r["neuron"]])]
        want = AgglomerativeClustering(n_clusters=None, distance_threshold=0.5, metric="cosine", linkage="average").fit_predict(x[rows])
        assert r["clusters"] == len(set(want)) == len(r["cluster_examples"])
        _, counts = np.unique(tokens[rows], return_counts=True)
        assert r["token_entropy"] == pytest.approx(min(1.0, scipy.stats.entropy(counts) / np.log(len(rows))))
        assert sorted(e["row"] for c in r["cluster_examples"] for e in c["examples"]) == sorted(rows)


def test_specialization_index_on_known_counts() -> None:
    spec = Specialization("h", 0, ["a", "b"], np.array([100, 300]), np.array([[10, 10, 30, 0], [0, 30, 10, 0]]), balanced=True)
    si = spec.si
    h = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert si[0] == pytest.approx(1.0) and si[1] == pytest.approx(0.0, abs=1e-12) and si[2] == pytest.approx(1 - h / np.log(2))
    assert np.isnan(si[3]) and spec.rows()[0]["top_task"] == "a" and spec.summary()["specialized"] == 2
    raw = Specialization("h", 0, ["a", "b"], spec.tokens, spec.active, balanced=False)
    np.testing.assert_allclose(raw.p_task[:, 1], [0.25, 0.75])


def test_specialization_of_a_store_equals_brute_force(stores) -> None:
    store = stores["all"]
    labels = task_labels(store, "task")
    assert labels.tolist() == [TASKS[i % 2] for i in range(len(labels))]
    spec = specialization(store, "layers.0.mlp_post", labels, block_rows=90)
    x = np.asarray(store.rows("layers.0.mlp_post")) > 0
    task = labels[np.asarray(store.index()[0])]
    rate = np.stack([x[task == t].mean(axis=0) for t in TASKS])
    p = rate / rate.sum(axis=0)
    np.testing.assert_allclose(spec.p_task, p)
    np.testing.assert_allclose(spec.si, 1 - scipy.stats.entropy(p, axis=0) / np.log(2))
    per_task = specialization_of_stores({t: stores[t] for t in TASKS}, "layers.0.mlp_post")
    rate = np.stack([(np.asarray(stores[t].rows("layers.0.mlp_post")) > 0).mean(axis=0) for t in TASKS])
    np.testing.assert_allclose(per_task.p_task, rate / rate.sum(axis=0))


def test_missing_task_labels_are_clear_errors(stores, tmp_path) -> None:
    with pytest.raises(NeuronError, match=r"docs.jsonl:1 has no task field 'topic' \(fields: text, task\)"):
        task_labels(stores["all"], "topic")
    with pytest.raises(NeuronError, match="a memory corpus keeps no field 'task'"):
        task_labels(stores["code"], "task")
    with pytest.raises(NeuronError, match="labels gives 2 tasks for"):
        task_labels(stores["code"], labels=["a", "b"])


def test_modularity_of_a_hand_made_graph() -> None:
    """Two triangles joined by one edge: m = 7, each side 3 internal edges and degree sum 7, so
    Q = 2 * (3/7 - (7/14)**2) = 5/14."""
    g = nx.Graph([(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)])
    nx.set_edge_attributes(g, 1.0, "weight")
    found = communities(g)
    assert found["communities"] == [[0, 1, 2], [3, 4, 5]] and found["modularity"] == pytest.approx(5 / 14)


def test_pmi_graph_equals_brute_force(stores) -> None:
    store = stores["all"]
    a = (np.asarray(store.rows("layers.0.mlp_post")) > 0).astype(np.int64)
    n, co = len(a), a.T @ a
    graph = pmi_graph(store, "layers.0.mlp_post", top_edges=40, min_count=5, block_rows=128)
    brute = []
    for i in range(128):
        for j in range(i + 1, 128):
            if co[i, j] >= 5:
                pmi = np.log(co[i, j] * n / (co[i, i] * co[j, j]))
                if pmi > 0:
                    brute.append((-pmi, i, j))
    brute.sort()
    want = {(f"layers.0.mlp_post:{i}", f"layers.0.mlp_post:{j}"): -p for p, i, j in brute[:40]}
    got = {tuple(sorted((u, v), key=lambda s: int(s.rsplit(":", 1)[1]))): d["weight"] for u, v, d in graph.edges(data=True)}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    found = communities(graph)
    assert found["modularity"] == pytest.approx(nx.community.modularity(graph, found["communities"], weight="weight"))


def test_comparing_two_stores_equals_scipy(stores) -> None:
    a, b = stores["code"], stores["prose"]
    result = compare_stores(a, b)
    assert [h["hook_id"] for h in result["hooks"]] == HOOKS
    xa, xb = (np.asarray(s.rows("layers.1.residual")).astype(np.float64) for s in (a, b))
    h = result["hooks"][1]
    for i in (0, 9, 63):
        ks = scipy.stats.ks_2samp(xa[:, i], xb[:, i])
        assert h["neurons"]["ks"][i] == pytest.approx(ks.statistic) and h["neurons"]["ks_pvalue"][i] == pytest.approx(ks.pvalue)
        assert h["neurons"]["wasserstein"][i] == pytest.approx(scipy.stats.wasserstein_distance(xa[:, i], xb[:, i]))
        assert h["neurons"]["mean_diff"][i] == pytest.approx(xb[:, i].mean() - xa[:, i].mean())
        assert h["neurons"]["rate_diff"][i] == pytest.approx((xb[:, i] > 0).mean() - (xa[:, i] > 0).mean())
    assert h["cka"] is None and "different tokens" in h["cka_note"]
    same = compare_stores(a, a)["hooks"][1]
    assert same["cka"] == pytest.approx(1.0) and same["ks_max"] == 0 and same["wasserstein_max"] == 0
    json.dumps(result)
