"""GET /v1/stores... on a real server (tiny Llama, ephemeral port): activation stores over HTTP, read-only.

- The list names every store under --store-root and nothing else (a folder without a manifest,
  a symlink to a store outside the root), with its hooks and widths.
- stats, top_examples, reverse, distribution and polysemantic answer what mlx_engine.analysis.neurons
  returns in-process on the same store (compared after a JSON round trip), and independently: the
  means equal numpy's mean of the stored rows (1e-9 relative), the top examples a brute-force sort
  of the column (1e-6), an n-gram's best neuron the brute-force mean over its occurrences (1e-9),
  a neuron's histogram np.histogram of its stored column with the route's edges (exact counts; the
  edges span the column's min and max, quartiles np.quantile's, 1e-9 relative), the polysemantic
  ranking the order of its own scores with every example accounted for.
- Bad input gets a 4xx with an OpenAI-style body: an unknown or path-like store id (404, never a
  file outside the root, never the root's path in a message), a hook the store lacks or a neuron
  out of range (400), a malformed query (400), a query past a work bound (400 naming the bound); a
  server without --store-root lists nothing and says how to set it.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path

import mlx_engine  # noqa: F401, I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
import requests
from neuroscope_server import running_server

from mlx_engine.analysis.neurons.common import TokenText
from mlx_engine.analysis.neurons.examples import top_examples
from mlx_engine.analysis.neurons.polysemantic import polysemanticity
from mlx_engine.analysis.neurons.reverse import neuron_ngrams, token_neurons
from mlx_engine.analysis.neurons.stats import distribution, layer_summary, neuron_table
from mlx_engine.store.reader import ActivationStore

HOOKS = ["layers.1.residual", "layers.2.mlp_post"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, llama_kit) -> Path:
    root = tmp_path_factory.mktemp("stores")
    lines = [line for line in inspect.getsource(json.decoder).splitlines() if line.strip()][:60]
    mlx_engine.extract(llama_kit, lines, HOOKS, root / "corpus-a", context_size=32, top_k=8, progress=False)
    (root / "not-a-store").mkdir()
    mlx_engine.extract(llama_kit, lines[:4], HOOKS[:1], root / "group" / "small", context_size=32, progress=False)
    outside = tmp_path_factory.mktemp("outside")
    mlx_engine.extract(llama_kit, lines[:5], HOOKS[:1], outside / "elsewhere", context_size=32, progress=False)
    os.symlink(outside / "elsewhere", root / "linked")
    return root


@pytest.fixture(scope="module")
def url(llama_checkpoint: Path, root: Path) -> Iterator[str]:
    with running_server(model=str(llama_checkpoint), store_root=root) as base:
        yield base


def get(url: str, path: str, **params) -> requests.Response:
    return requests.get(f"{url}{path}", params=params, timeout=60)


def same(got, want) -> bool:
    """Equal after a JSON round trip (NaN, which JSON lacks, sent as null)."""
    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return got == json.loads(json.dumps(clean(want), default=float))


def test_the_list_names_the_stores_under_the_root_only(url: str) -> None:
    listed = get(url, "/v1/stores").json()
    assert listed["object"] == "list" and [s["id"] for s in listed["data"]] == ["corpus-a", "group/small"]
    store = listed["data"][0]
    assert store["status"] == "complete" and store["tokens"] > 0 and store["model"]
    assert [(h["hook"], h["width"]) for h in store["hooks"]] == [("layers.1.residual", 64), ("layers.2.mlp_post", 128)]


def test_stats_equal_the_in_process_table(url: str, root: Path) -> None:
    store = ActivationStore.open(root / "corpus-a")
    answer = get(url, "/v1/stores/corpus-a/stats", hook="layers.2.mlp_post")
    assert answer.status_code == 200, answer.text
    got = answer.json()
    table = neuron_table(store, "layers.2.mlp_post")
    assert len(got["neurons"]) == 128 and same(got["neurons"], table.rows()) and same(got["summary"], layer_summary(table))
    rows = np.asarray(store.rows("layers.2.mlp_post"), np.float64)
    assert np.allclose([n["mean"] for n in got["neurons"]], rows.mean(axis=0), rtol=1e-9, atol=1e-12)
    nested = get(url, "/v1/stores/group/small/stats", hook="layers.1.residual").json()
    assert nested["store"] == "group/small" and len(nested["neurons"]) == 64


def test_top_examples_equal_a_brute_force_sort(url: str, root: Path) -> None:
    store = ActivationStore.open(root / "corpus-a")
    neuron = 17
    got = get(url, "/v1/stores/corpus-a/top_examples", hook="layers.1.residual", neuron=neuron, k=5, context=3).json()
    assert same(got["examples"], top_examples(store, "layers.1.residual", neuron, 5, 3))
    column = np.asarray(store.rows("layers.1.residual"))[:, neuron]
    assert np.allclose([e["maxValue"] for e in got["examples"]], np.sort(column)[::-1][:5], rtol=1e-6)
    for e in got["examples"]:
        assert e["values"][e["maxValueTokenIndex"]] == pytest.approx(e["maxValue"], rel=1e-6)
        assert len(e["tokens"]) == len(e["values"]) <= 7


def test_reverse_queries_in_both_directions(url: str, root: Path) -> None:
    store = ActivationStore.open(root / "corpus-a")
    tokens = np.asarray(store.tokens())
    token = int(np.bincount(tokens).argmax())
    got = get(url, "/v1/stores/corpus-a/reverse", hook="layers.2.mlp_post", ngram=f"#{token}", k=4).json()
    want = token_neurons(store, [token], ["layers.2.mlp_post"], top=4)
    assert same({k: v for k, v in got.items() if k not in ("object", "store", "hook")}, want)
    assert same(get(url, "/v1/stores/corpus-a/reverse", hook="layers.2.mlp_post", ngram=str(token), k=4).json()["hooks"], want["hooks"])
    rows = np.asarray(store.rows("layers.2.mlp_post"), np.float64)[tokens == token]
    assert got["count"] == len(rows)
    best = got["hooks"]["layers.2.mlp_post"]["neurons"][0]
    assert best["neuron"] == int(rows.mean(axis=0).argmax())
    assert best["mean"] == pytest.approx(rows.mean(axis=0).max(), rel=1e-9)
    by_neuron = get(url, "/v1/stores/corpus-a/reverse", hook="layers.2.mlp_post", neuron=3, n=2, k=3).json()
    want_ngrams = neuron_ngrams(store, "layers.2.mlp_post", [3], (1, 2), top=3)[3]
    assert list(by_neuron["ngrams"]) == ["1", "2"] and same(by_neuron["ngrams"], {str(n): r for n, r in want_ngrams.items()})


@pytest.mark.parametrize("hook, neuron, bins", [("layers.2.mlp_post", 5, 16), ("layers.1.residual", 63, None)])
def test_distribution_is_numpys_histogram_of_the_stored_column(url: str, root: Path, hook: str, neuron: int, bins) -> None:
    store = ActivationStore.open(root / "corpus-a")
    params = {"hook": hook, "neuron": neuron, **({} if bins is None else {"bins": bins})}
    answer = get(url, "/v1/stores/corpus-a/distribution", **params)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    column = np.asarray(store.rows(hook), np.float64)[:, neuron]
    edges = np.asarray(got["edges"])
    assert got["bins"] == (bins or 64) and len(edges) == got["bins"] + 1 and len(got["counts"]) == got["bins"]
    assert got["exact"] and got["sample_rows"] == got["total_rows"] == len(column) == sum(got["counts"])
    assert got["counts"] == np.histogram(column, bins=edges)[0].tolist()
    assert got["range"] == [edges[0], edges[-1]] and np.allclose(got["range"], [column.min(), column.max()], rtol=1e-9, atol=0)
    assert np.allclose([got["q1"], got["median"], got["q3"]], np.quantile(column, [0.25, 0.5, 0.75]), rtol=1e-9, atol=1e-12)
    assert got["mean"] == pytest.approx(column.mean(), rel=1e-9) and got["std"] == pytest.approx(column.std(), rel=1e-6)
    want = distribution(store, hook, bins=bins or 64)  # the same function in-process
    assert same(got["edges"], want.edges[neuron].tolist()) and same(got["counts"], want.counts[neuron].tolist())
    assert got["z_outliers"] == int(want.z_outliers[neuron]) and got["iqr_outliers"] == int(want.iqr_outliers[neuron])


def test_polysemantic_ranking_is_the_python_functions(url: str, root: Path, llama_kit) -> None:
    store = ActivationStore.open(root / "corpus-a")
    hook = "layers.1.residual"
    answer = get(url, "/v1/stores/corpus-a/polysemantic", hook=hook, top=10)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    text = TokenText(store, llama_kit)  # the route decodes with the loaded model that wrote the store
    want = polysemanticity(store, hook, text=text)
    assert got["scored"] == 64 and got["k"] == 8 and len(got["neurons"]) == 10 and same(got["neurons"], want[:10])
    assert got["neurons"][0]["clusters"] > want[-1]["clusters"]  # the ranking separates neurons on this store
    keys = [(-r["clusters"], -r["token_entropy"], r["neuron"]) for r in got["neurons"]]
    assert keys == sorted(keys) and [r["rank"] for r in got["neurons"]] == list(range(10))
    for r in got["neurons"]:
        assert sum(c["size"] for c in r["cluster_examples"]) == r["examples"] == 8 and len(r["cluster_examples"]) == r["clusters"]
    chosen = get(url, "/v1/stores/corpus-a/polysemantic", hook="layers.2.mlp_post", neurons="3,17,40", k=4, distance=0.3, top=2).json()
    want = polysemanticity(store, "layers.2.mlp_post", [3, 17, 40], k=4, distance=0.3, text=text)
    assert chosen["scored"] == 3 and chosen["k"] == 4 and same(chosen["neurons"], want[:2])
    assert {r["neuron"] for r in want} == {3, 17, 40}


def test_work_bounds_are_400s_naming_the_limit(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_engine.server.routes import stores

    monkeypatch.setattr(stores, "MAX_HISTOGRAM_CELLS", 64 * 10)
    answer = get(url, "/v1/stores/corpus-a/distribution", hook="layers.1.residual", neuron=0, bins=10)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "store_query_too_large"
    assert "at most 9 bins" in answer.json()["error"]["message"] and answer.json()["error"]["param"] == "bins"
    monkeypatch.setattr(stores, "MAX_CLUSTERED", 100)
    answer = get(url, "/v1/stores/corpus-a/polysemantic", hook="layers.1.residual")
    assert answer.status_code == 400 and "64 neurons x 8 examples is more than 100" in answer.json()["error"]["message"]
    assert get(url, "/v1/stores/corpus-a/polysemantic", hook="layers.1.residual", neurons="1,2", k=8).status_code == 200


@pytest.mark.parametrize("endpoint", ["distribution", "polysemantic"])
def test_the_neuron_routes_answer_unknown_stores_with_404(url: str, endpoint: str) -> None:
    answer = get(url, f"/v1/stores/nope/{endpoint}", hook="layers.1.residual", neuron=0)
    if endpoint == "polysemantic":
        answer = get(url, "/v1/stores/nope/polysemantic", hook="layers.1.residual")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "store_not_found"


@pytest.mark.parametrize("path", ["/v1/stores/nope/stats", "/v1/stores/not-a-store/stats", "/v1/stores/linked/stats",
                                  "/v1/stores/..%2F..%2Fetc/stats", "/v1/stores/%2E%2E/stats", "/v1/stores/group/stats",
                                  "/v1/stores/%2Fetc/stats"])
def test_unknown_or_path_like_ids_are_404(url: str, root: Path, path: str) -> None:
    answer = requests.get(f"{url}{path}", params={"hook": "layers.1.residual"}, timeout=30)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "store_not_found" and str(root) not in answer.text


@pytest.mark.parametrize("endpoint, params, needle", [
    ("stats", {"hook": "layers.9.residual"}, "is not in the store 'corpus-a'"),
    ("top_examples", {"hook": "layers.1.residual", "neuron": 64}, "64"),
    ("top_examples", {"hook": "layers.1.residual", "neuron": "x"}, "neuron"),
    ("top_examples", {"hook": "layers.1.residual", "neuron": 1, "k": 0}, "k"),
    ("top_examples", {"hook": "layers.1.residual", "neuron": 1, "bogus": 1}, "bogus"),
    ("stats", {}, "hook"),
    ("reverse", {"hook": "layers.1.residual"}, "exactly one"),
    ("reverse", {"hook": "layers.1.residual", "neuron": 1, "ngram": "#1"}, "exactly one"),
    ("reverse", {"neuron": 1}, "hook"),
    ("reverse", {"hook": "layers.1.residual", "neuron": 1, "n": 9}, "n"),
    ("distribution", {"hook": "layers.1.residual", "neuron": 64}, "64"),
    ("distribution", {"hook": "layers.9.residual", "neuron": 1}, "is not in the store 'corpus-a'"),
    ("distribution", {"hook": "layers.1.residual"}, "neuron"),
    ("distribution", {"hook": "layers.1.residual", "neuron": 1, "bins": 0}, "bins"),
    ("distribution", {"hook": "layers.1.residual", "neuron": 1, "bins": 1025}, "bins"),
    ("polysemantic", {}, "hook"),
    ("polysemantic", {"hook": "layers.9.residual"}, "is not in the store 'corpus-a'"),
    ("polysemantic", {"hook": "layers.1.residual", "neurons": "1,x"}, "neurons"),
    ("polysemantic", {"hook": "layers.1.residual", "neurons": "1,640"}, "640"),
    ("polysemantic", {"hook": "layers.1.residual", "top": 0}, "top"),
    ("polysemantic", {"hook": "layers.1.residual", "k": 1}, "k"),
    ("polysemantic", {"hook": "layers.1.residual", "distance": 0}, "distance"),
    ("polysemantic", {"hook": "layers.1.residual", "distance": 2.5}, "distance"),
])
def test_bad_queries_are_400_with_a_reason(url: str, root: Path, endpoint: str, params: dict, needle: str) -> None:
    answer = get(url, f"/v1/stores/corpus-a/{endpoint}", **params)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert needle in error["message"] and str(root) not in answer.text and set(error) == {"message", "type", "param", "code"}


def test_without_a_store_root_the_list_is_empty_and_queries_say_how(llama_checkpoint: Path) -> None:
    with running_server(model=str(llama_checkpoint)) as base:
        assert get(base, "/v1/stores").json() == {"object": "list", "data": []}
        answer = get(base, "/v1/stores/x/stats", hook="h")
        assert answer.status_code == 404 and "--store-root" in answer.json()["error"]["message"]
