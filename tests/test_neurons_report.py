"""End to end on the embedded default model (gpt-oss, MoE): extract over held-out standard-library files (files
the default model never trained on, in two task folders), then `mlx-engine analyze report`: a new timestamped
folder whose report holds real statistics, dead neurons, top examples, reverse queries, specialization,
dynamic-k on expert_post and every figure (PNG opened and sized, SVG searched for its title and axis labels);
each number checked is recomputed here from the store's rows. Then `analyze neurons` and the errors of bad input.
"""

from __future__ import annotations

import csv
import curses.ascii
import getopt
import html
import inspect
import json
import json.scanner
import pty
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
from PIL import Image

from mlx_engine.analysis.neurons.projections import umap_available
from mlx_engine.cli import main

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

HOOKS = ["layers.0.residual", "layers.1.residual", "layers.2.residual", "layers.3.residual", "layers.3.router"]
DEAD_AT = 3.0  # "dead": never above this (the residual stream has no unit that is never positive)
CHARS = 1400  # of each held-out file: the corpus stays small enough for a quick test

# Axis and colour-bar labels each figure must carry (by name prefix), besides its title.
LABELS = {
    "sparsity": ["layer (hook)", "fraction of token x neuron values active", "neurons", "share of the layer's neurons"],
    "activation_histograms": ["activation value", "count of sampled values (log scale)"],
    "neuron_moments": ["skewness", "excess kurtosis", "fraction of tokens active"],
    "examples_": ["position relative to the peak token", "example: peak value (document, position)", "activation"],
    "reverse_": ["mean activation over occurrences", "token (occurrences)", "2-gram (occurrences)"],
    "token_neurons_": ["rank (cell: neuron number)", "layer (hook)", "mean activation at the n-gram"],
    "polysemanticity": ["clusters among a neuron's top contexts", "layer (hook)", "neurons"],
    "coactivation_": ["neuron (ordered by cluster)", "co-activation (Pearson r over tokens)"],
    "projection_pca": ["principal component 1", "principal component 2", "layer", "document", "activation of neuron"],
    "projection_tsne": ["t-SNE dimension 1", "t-SNE dimension 2", "layer", "document"],
    "projection_umap": ["UMAP dimension 1", "UMAP dimension 2", "layer"],
    "pca_variance": ["number of principal components", "cumulative explained variance ratio"],
    "cka": ["layer (hook)", "linear CKA"],
    "specialization": ["specialization index SI", "layer (hook)", "neurons"],
    "pmi_graph_": ["spring layout x (edge weight: PMI)", "community (Louvain)"],
    "store_comparison": ["layer (hook)", "mean KS statistic over neurons", "mean Wasserstein distance", "linear CKA (a vs b)"],
    "dynamic_k_plot": ["fraction of d_mlp = 256 kept per token", "perplexity on held-out text", "tokens per second"],
}


def svg_texts(path: Path) -> list[str]:
    return ["".join(node.itertext()) for node in ET.parse(path).iter() if node.tag.endswith("}text")]


@pytest.fixture(scope="module")
def default_kit():
    return mlx_engine.load_model("default")


@pytest.fixture(scope="module")
def store(default_kit, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("neurons_default")
    for task, modules in (("cli", (getopt, pty)), ("markup", (html, curses.ascii))):
        (root / "corpus" / task).mkdir(parents=True)
        for m in modules:
            (root / "corpus" / task / f"{m.__name__.replace('.', '_')}.py").write_text(inspect.getsource(m)[:CHARS], encoding="utf-8")
    (root / "held_out.py").write_text(inspect.getsource(json.scanner), encoding="utf-8")
    return mlx_engine.extract(default_kit, root / "corpus", HOOKS, root / "store", context_size=256, batch_size=4, top_k=8, progress=False)


@pytest.fixture(scope="module")
def bf16_store(default_kit, store):
    """The same corpus stored in bfloat16: a second store with the same tokens, for the comparison."""
    return mlx_engine.extract(default_kit, store.path.parent / "corpus", HOOKS, store.path.parent / "store_bf16", context_size=256,
                              batch_size=4, top_k=8, dtype="bfloat16", progress=False)


@pytest.fixture(scope="module")
def report(store, bf16_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("neurons_report")
    args = ["analyze", "report", str(store.path), "--out", str(out), "--task-field", "folder", "--held-out",
            str(store.path.parent / "held_out.py"), "--window", "48", "--windows", "1", "--points", "300", "--query-tokens", "1",
            "--dead-threshold", str(DEAD_AT), "--compare", str(bf16_store.path)]
    assert main(args) == 0
    (folder,) = list(out.iterdir())
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_the_report_holds_the_stores_real_statistics(store, report: Path) -> None:
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["kind"] == "neurons" and sorted(p.name for p in report.iterdir()) == manifest["files"]
    assert report.name[:8].isdigit() and manifest["model"] == "default"
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for heading in ("Statistics per layer", "Dead and saturated neurons", "Top-activating examples", "Reverse queries",
                    "Polysemantic neurons", "Co-activation clusters", "Projections and cross-layer similarity",
                    "Specialization and modularity", "Dynamic-k", "Comparison with another store"):
        assert f"## {heading}" in md and f"<h2>{heading}</h2>" in page
    layers = {row["hook_id"]: row for row in read_csv(report / "layer_statistics.csv")}
    for hook in HOOKS:
        x = np.asarray(store.rows(hook)).astype(np.float64)
        row = layers[hook]
        assert int(row["tokens"]) == len(x) == store.num_tokens
        assert float(row["mean"]) == pytest.approx(x.mean(), abs=1e-9) and float(row["std"]) == pytest.approx(x.std(), rel=1e-9)
        assert float(row["frac_active"]) == pytest.approx((x > 0).mean())
        assert int(row["dead"]) == int((x.max(axis=0) <= DEAD_AT).sum())
        info = store.hook_info(hook)
        assert f"| L{info['layer']} {info['component']} | {row['dead']} |" in md  # the dead-neuron table's line
    neurons = read_csv(report / "neuron_statistics.csv")
    assert len(neurons) == sum(store.hook_info(h)["width"] for h in HOOKS)
    router = np.asarray(store.rows("layers.3.router")).astype(np.float64)
    mine = [r for r in neurons if r["hook_id"] == "layers.3.router"]
    np.testing.assert_allclose([float(r["max"]) for r in mine], router.max(axis=0))
    assert [r["dead"] == "True" for r in mine] == (router.max(axis=0) <= DEAD_AT).tolist()
    results = json.loads((report / "results.json").read_text())
    assert results["dead"] == {h: np.nonzero(np.asarray(store.rows(h)).max(axis=0) <= DEAD_AT)[0].tolist() for h in HOOKS}
    assert sum(map(len, results["dead"].values())) > 0 and f"Dead: never above {DEAD_AT}" in md


def test_the_reports_examples_and_reverse_queries_equal_the_rows(store, report: Path) -> None:
    examples = json.loads((report / "top_examples.json").read_text())
    doc, pos = (np.asarray(a) for a in store.index())
    for hook in HOOKS:
        x = np.asarray(store.rows(hook))
        for neuron, found in examples[hook].items():
            order = np.lexsort((pos, doc, -x[:, int(neuron)].astype(np.float64)))[: len(found)]
            assert [e["row"] for e in found] == order.tolist()
            assert all(set(e) >= {"tokens", "values", "maxValue", "maxValueTokenIndex"} and isinstance(e["tokens"][0], str) for e in found)
    reverse = json.loads((report / "reverse_queries.json").read_text())
    (query,) = reverse["tokens"]
    tokens = np.asarray(store.tokens())
    assert query["count"] == int((tokens == query["ngram"][0]).sum()) == int(np.bincount(tokens).max())
    for hook, got in query["hooks"].items():
        mean = np.asarray(store.rows(hook)).astype(np.float64)[tokens == query["ngram"][0]].mean(axis=0)
        assert got["neurons"][0]["neuron"] == int(np.argmax(mean))
    hook = HOOKS[0]
    neuron = str(results_detail(report)[hook][0])
    top_token = reverse["neurons"][hook][neuron]["1"][0]
    x = np.asarray(store.rows(hook)).astype(np.float64)[:, int(neuron)]
    means = {t: x[tokens == t].mean() for t in np.unique(tokens)}
    assert top_token["ngram"] == [max(means, key=lambda t: (means[t], -t))]
    assert (report / "top_examples.html").read_text().count("<span") > 50


def results_detail(report: Path) -> dict[str, list[int]]:
    return json.loads((report / "results.json").read_text())["detail_neurons"]


def test_the_report_has_specialization_modularity_and_dynamic_k(store, report: Path) -> None:
    si = read_csv(report / "si_modularity.csv")
    assert [r["hook_id"] for r in si] == HOOKS and all(r["tasks"] == "2" and float(r["modularity"]) > 0 for r in si)
    per_neuron = read_csv(report / "neuron_specialization.csv")
    assert {"si", "top_task", "p_cli", "p_markup"} <= set(per_neuron[0])
    runs = read_csv(report / "dynamic_k.csv")
    assert len(runs) == 7 * 3 and {r["fraction"] for r in runs} == {"unmodified", "0.1", "0.2", "0.3", "0.5", "0.7", "1.0"}
    result = json.loads((report / "results.json").read_text())["dynamic_k"]
    assert result["component"] == "expert_post" and result["d_mlp"] == 256 and result["k1_difference"] <= 0.01
    assert all(float(r["perplexity"]) > 1 and float(r["tokens_per_second"]) > 0 for r in runs)


def test_the_comparison_with_the_bfloat16_store_equals_scipy(store, bf16_store, report: Path) -> None:
    import scipy.stats

    comparison = json.loads((report / "comparison.json").read_text())
    for h in comparison["hooks"]:
        a, b = (np.asarray(s.rows(h["hook_id"])).astype(np.float64) for s in (store, bf16_store))
        assert np.abs(a - b).max() <= 2**-7 * np.abs(a).max()  # bfloat16 keeps 8 significant bits
        ca, cb = a - a.mean(axis=0), b - b.mean(axis=0)
        cka = np.linalg.norm(cb.T @ ca) ** 2 / (np.linalg.norm(ca.T @ ca) * np.linalg.norm(cb.T @ cb))
        assert h["cka"] == pytest.approx(cka, rel=1e-9) and cka > 0.999  # the same tokens: CKA is defined, and near 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy's exact KS may fall back to the asymptotic one
            ks = [scipy.stats.ks_2samp(a[:, i], b[:, i]).statistic for i in range(3)]
        np.testing.assert_allclose(h["neurons"]["ks"][:3], ks)
        assert h["wasserstein_max"] <= 2**-7 * np.abs(a).max()


def test_every_figure_is_titled_labelled_and_sized(report: Path) -> None:
    manifest = json.loads((report / "manifest.json").read_text())
    names = [f["name"] for f in manifest["figures"]]
    assert ("projection_umap" in names) == umap_available()
    for prefix in LABELS:
        assert any(n.startswith(prefix) for n in names) or prefix == "projection_umap", prefix
    for figure in manifest["figures"]:
        with Image.open(report / figure["files"]["png"]) as image:
            assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200, (figure["name"], image.size)
        texts = svg_texts(report / figure["files"]["svg"])
        assert figure["title"] in texts, figure["name"]
        prefix = max((p for p in LABELS if figure["name"].startswith(p)), key=len)
        for label in LABELS[prefix]:
            assert any(label in t for t in texts), (figure["name"], label)
        lines = (report / figure["files"]["csv"]).read_text().splitlines()
        assert len(lines) >= 2 and "," in lines[0]


def test_neurons_command_prints_json(store, capsys: pytest.CaptureFixture) -> None:
    assert main(["analyze", "neurons", str(store.path), "--hook", "layers.3.router", "--neuron", "2", "--k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)["2"]
    router = np.asarray(store.rows("layers.3.router")).astype(np.float64)
    assert out["statistics"]["max"] == pytest.approx(router[:, 2].max()) and len(out["top_examples"]) == 3
    assert out["top_examples"][0]["maxValue"] == pytest.approx(router[:, 2].max())
    assert main(["analyze", "neurons", str(store.path), "--hook", "layers.3.router", "--token", "def", "--k", "2"]) == 0
    token = json.loads(capsys.readouterr().out)
    assert token["count"] > 0 and len(token["hooks"]["layers.3.router"]["neurons"]) == 2


def test_bad_input_gets_a_clear_error(store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["analyze", "report", str(store.path), "--out", str(tmp_path), "--hooks", "layers.9.residual"],
         "hook 'layers.9.residual' is not in the store"),
        (["analyze", "neurons", str(store.path), "--hook", "layers.3.router", "--neuron", "8"], "neuron 8 is out of range: layers.3.router has 8 neurons"),
        (["analyze", "report", str(store.path), "--out", str(tmp_path), "--task-field", "topic"], "a folder corpus keeps no field 'topic'"),
        (["analyze", "report", str(tmp_path), "--out", str(tmp_path)], "is not an activation store"),
        (["analyze", "report", str(store.path), "--out", str(tmp_path), "--held-out", str(tmp_path / "missing.txt")], "not found"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, message
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made
