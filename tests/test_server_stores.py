"""GET /v1/stores... on a real server (tiny Llama, ephemeral port): activation stores over HTTP, read-only.

- The list names every store under --store-root and nothing else (a folder without a manifest,
  a symlink to a store outside the root), with its hooks and widths.
- stats, top_examples and reverse answer what mlx_engine.analysis.neurons returns in-process on
  the same store (compared after a JSON round trip), and independently: the means equal numpy's
  mean of the stored rows (1e-9 relative), the top examples a brute-force sort of the column
  (1e-6), an n-gram's best neuron the brute-force mean over its occurrences (1e-9).
- Bad input gets a 4xx with an OpenAI-style body: an unknown or path-like store id (404, never a
  file outside the root, never the root's path in a message), a hook the store lacks or a neuron
  out of range (400), a malformed query (400); a server without --store-root lists nothing and
  says how to set it.
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

from mlx_engine.analysis.neurons.examples import top_examples
from mlx_engine.analysis.neurons.reverse import neuron_ngrams, token_neurons
from mlx_engine.analysis.neurons.stats import layer_summary, neuron_table
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
