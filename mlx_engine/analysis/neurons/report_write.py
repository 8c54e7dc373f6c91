"""`write_neuron_report`: the computed analyses as a new timestamped folder (analysis/report.py's
`analysis_folder` and `write_report`): figures, CSV and JSON tables, top_examples.html,
report.md, report.html and manifest.json. Every number in the text and tables is read
from the results; nothing is typed in.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..report import Section, analysis_folder, write_report
from .examples import examples_html
from .figures import (
    examples_figure,
    histogram_figure,
    moments_figure,
    polysemantic_figure,
    reverse_figure,
    sparsity_figure,
    token_neurons_figure,
)
from .figures_maps import (
    cka_figure,
    coactivation_figure,
    compare_figure,
    dynamic_k_figure,
    pca_figure,
    pmi_graph_figure,
    projection_figure,
    specialization_figure,
)

LAYER_COLUMNS = ["hook_id", "width", "mean", "std", "skewness", "kurtosis", "min", "max", "frac_active", "dead", "saturated",
                 "z_outlier_fraction", "iqr_outlier_fraction", "participation_ratio_mean", "l1_participation", "compression_potential"]


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v)), encoding="utf-8")


def _shown(tokens: Sequence[str]) -> str:
    return json.dumps("".join(tokens), ensure_ascii=False)


def _statistics(r: dict[str, Any], objects: dict[str, Any], folder: Path) -> list[Section]:
    hooks, names = r["hooks"], r["names"]
    write_csv(folder / "layer_statistics.csv", r["layers"])
    write_csv(folder / "neuron_statistics.csv", [row for h in hooks for row in objects["tables"][h].rows()])
    sample = f"all {r['tokens']} rows" if r["sample_exact"] else f"{r['sample_rows']} of {r['tokens']} rows, evenly spaced"
    text = [f"Moments, extremes and activity come from the store's online statistics over all {r['tokens']} tokens (no second pass); "
            f"histograms, quartiles, outliers and saturation from {sample}. Outliers: |x - mean| > 4 std (z rule) and outside "
            "[Q1 - 1.5 IQR, Q3 + 1.5 IQR] (Tukey). Compression potential: the smallest share of neurons holding 90% of the layer's "
            "L1 mass. Per-neuron values for every hook: neuron_statistics.csv; per layer: layer_statistics.csv."]
    rows = [[names[s["hook_id"]]] + [s.get(c) for c in LAYER_COLUMNS[1:]] for s in r["layers"]]
    figures = [sparsity_figure(r["layers"], [names[h] for h in hooks], folder),
               histogram_figure([objects["distributions"][h] for h in hooks], [names[h] for h in hooks], folder),
               moments_figure([objects["tables"][h] for h in hooks], [names[h] for h in hooks], folder)]
    main = Section("Statistics per layer", text, [("Per layer (pooled over its neurons)", ["layer"] + LAYER_COLUMNS[1:], rows)], figures)
    dead_rows = [[names[h], len(r["dead"][h]), " ".join(map(str, r["dead"][h][:30])), len(r["saturated"][h]["neurons"]),
                  " ".join(map(str, r["saturated"][h]["neurons"][:30]))] for h in hooks]
    rule = r["saturated"][hooks[0]]["rule"]
    how = (f"within {rule['tolerance']} x range of the bounds {rule['bounds']}" if rule["kind"] == "bounds"
           else f"above the layer's {rule['quantile']} quantile")
    dead_text = [f"Dead: never above {r['layers'][0]['dead_threshold']} over all tokens (online maximum). Saturated: {how} on more "
                 f"than {rule['saturated_fraction']:.0%} of sampled tokens."]
    dead = Section("Dead and saturated neurons", dead_text, [("Counts per layer (first 30 listed)",
                   ["layer", "dead", "dead neurons", "saturated", "saturated neurons"], dead_rows)])
    return [main, dead]


def _examples(r: dict[str, Any], folder: Path) -> Section:
    hooks, names, context = r["hooks"], r["names"], r["options"]["context"]
    _json(folder / "top_examples.json", r["examples"])
    page = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Top-activating examples</title></head><body>"]
    tables, figures = [], []
    for h in hooks:
        for neuron, examples in r["examples"][h].items():
            page.append(examples_html(examples, f"{h} neuron {neuron}"))
            lines = r["examples_text"][h][neuron].splitlines()
            tables.append((f"{names[h]} neuron {neuron}: top {len(examples)} examples (shade: ░ ▒ ▓ █ by quarters of the largest)",
                           ["value", "doc", "pos", "peak token", "context"],
                           [[e["maxValue"], e["doc"], e["pos"], json.dumps(e["token"], ensure_ascii=False), line.split(": ", 1)[1]]
                            for e, line in zip(examples, lines)]))
        first = r["detail_neurons"][h][0]
        figures.append(examples_figure(r["examples"][h][first], f"{names[h]} neuron {first}", f"examples_{h}_{first}", folder, context))
    page.append("</body></html>")
    (folder / "top_examples.html").write_text("\n".join(page), encoding="utf-8")
    text = [f"Each hook's neurons with the largest peaks and its most polysemantic neuron, from the store's online top-k, with "
            f"{context} tokens of context on each side. Neuronpedia's fields (tokens, values, maxValue, maxValueTokenIndex) for "
            "every example: top_examples.json; shaded by value: top_examples.html."]
    return Section("Top-activating examples", text, tables, figures)


def _reverse(r: dict[str, Any], objects: dict[str, Any], folder: Path) -> Section:
    hooks, names = r["hooks"], r["names"]
    tables, figures = [], []
    for h in hooks:
        for neuron, by_n in r["reverse"][h].items():
            rows = [[n, _shown(g["text"]), " ".join(map(str, g["ngram"])), g["count"], g["mean"]] for n, items in by_n.items() for g in items[:5]]
            tables.append((f"{names[h]} neuron {neuron}: n-grams by mean activation", ["n", "n-gram", "ids", "count", "mean"], rows))
        neuron = r["detail_neurons"][h][0]
        figures.append(reverse_figure(r["reverse"][h][neuron], f"{names[h]} neuron {neuron}", f"reverse_{h}_{neuron}", folder))
    for q, result in enumerate(r["token_neurons"]):
        rows = [[names[h], v["neurons"][0]["neuron"], v["neurons"][0]["mean"], v["neurons"][0]["zscore"],
                 " ".join(str(n["neuron"]) for n in v["neurons"][1:])] for h, v in result["hooks"].items()]
        tables.append((f"Neurons that {_shown(result['text'])} (ids {result['ngram']}, {result['count']} occurrences) activates most",
                       ["layer", "top neuron", "mean", "z-score", "next neurons"], rows))
        if result["hooks"]:
            figures.append(token_neurons_figure(result, folder, f"token_neurons_{q}"))
    _json(folder / "reverse_queries.json", {"neurons": r["reverse"], "tokens": r["token_neurons"]})
    text = ["An n-gram's occurrence is a row whose token ends it (same document, consecutive positions); the activation is the "
            f"neuron's value there. Bigrams and longer are ranked among those seen at least {r['options']['min_count']} times. "
            "All results: reverse_queries.json."]
    return Section("Reverse queries", text, tables, figures)


def _polysemantic(r: dict[str, Any], folder: Path) -> Section:
    hooks, names = r["hooks"], r["names"]
    rows = []
    for h in hooks:
        for p in r["polysemantic"][h][:5]:
            clusters = "; ".join(f"{c['size']}x " + " ".join(json.dumps(e["token"], ensure_ascii=False) for e in c["examples"][:4])
                                 for c in p["cluster_examples"][:4])
            rows.append([names[h], p["rank"] + 1, p["neuron"], p["clusters"], p["token_entropy"], p["distinct_tokens"], clusters])
    _json(folder / "polysemantic_neurons.json", r["polysemantic"])
    text = [f"Score: the number of clusters of a neuron's top contexts (their whole activation vectors at this layer; agglomerative, "
            f"average linkage, cosine distance cut at {r['options']['distance']}); then the normalised entropy of their tokens."]
    figure = polysemantic_figure(r["polysemantic_clusters"], [names[h] for h in hooks], folder)
    return Section("Polysemantic neurons", text, [("The five highest-scoring neurons per layer, with each cluster's tokens",
                   ["layer", "rank", "neuron", "clusters", "token entropy", "distinct tokens", "clusters (size x tokens)"], rows)], [figure])


def _population(r: dict[str, Any], objects: dict[str, Any], folder: Path) -> list[Section]:
    hooks, names = r["hooks"], r["names"]
    rows = [[names[c["hook_id"]], c["method"], c["clusters"], c["noise"], c["silhouette"], " ".join(map(str, c["sizes"]))] for c in r["clusters"]]
    figures = [coactivation_figure(objects["clusters"][(hooks[0], m)], f"coactivation_{m}", folder) for m in ("kmeans", "agglomerative", "dbscan")]
    cluster = Section("Co-activation clusters", ["Neurons clustered by the Pearson correlation of their values over the sampled tokens "
                      "(k-means on correlation profiles; agglomerative and DBSCAN on 1 - r)."],
                      [("Clusters per layer and method", ["layer", "method", "clusters", "noise", "silhouette", "sizes"], rows)], figures)
    figures = [projection_figure(p, names, folder) for p in objects["projections"].values()]
    figures += [pca_figure(r["pca"], names, folder), cka_figure(r["cka"], names, folder)]
    rows = [[names[h], s["components_for_90"], s["participation_ratio"], s["explained_variance_ratio"][0]] for h, s in r["pca"].items()]
    corr = [[names[c["hook_a"]], names[c["hook_b"]], c["method"], c["mean_abs_r"], c["max_abs_r"],
             " ".join(f"{p['neuron_a']}-{p['neuron_b']} ({p['r']:.2f})" for p in c["top_pairs"][:3])] for c in r["correlations"]]
    proj_text = [f"Projections of token positions of {', '.join(names[h] for h in r['projections'][next(iter(r['projections']))]['hooks'])}"
                 if r["projections"] else "No projection was computed."] + r["notes"]
    proj = Section("Projections and cross-layer similarity", proj_text,
                   [("PCA per layer", ["layer", "components for 90% variance", "eigenvalue participation ratio", "PC1 variance ratio"], rows),
                    ("Neuron correlations between consecutive layers", ["layer a", "layer b", "method", "mean |r|", "max |r|", "top pairs"], corr)],
                   figures)
    return [cluster, proj]


def _specialization(r: dict[str, Any], objects: dict[str, Any], folder: Path) -> Section:
    hooks, names = r["hooks"], r["names"]
    write_csv(folder / "si_modularity.csv", r["si_modularity"])
    figures = []
    specs = objects["specializations"]
    if specs:
        write_csv(folder / "neuron_specialization.csv", [row for s in specs.values() for row in s.rows()])
        figures.append(specialization_figure(list(specs.values()), names, folder))
    figures.append(pmi_graph_figure(objects["graphs"][hooks[0]], r["communities"][hooks[0]], f"pmi_graph_{hooks[0]}", names[hooks[0]], folder))
    cols = ["tasks", "si_mean", "si_median", "specialized", "pmi_edges", "communities", "modularity"]
    rows = [[names[x["hook_id"]]] + [x[c] for c in cols] for x in r["si_modularity"]]
    text = [("Tasks from the corpus field " + repr(r["options"]["task_field"]) + ": P(task | active) with a uniform prior over tasks; "
             "SI = 1 - H/log K (per neuron: neuron_specialization.csv).") if specs else "No task field was given, so SI is not computed.",
            "Co-activation graph: the top positive-PMI neuron pairs; Louvain communities and modularity Q (networkx). si_modularity.csv."]
    return Section("Specialization and modularity", text, [("Per layer", ["layer"] + cols, rows)], figures)


def _dynamic_k(r: dict[str, Any], folder: Path) -> Section:
    d = r["dynamic_k"]
    write_csv(folder / "dynamic_k.csv", d["rows"])
    rows = [[s["fraction"], s["k"], s["perplexity_mean"], s["perplexity_std"], s["relative_perplexity_mean"], s["relative_perplexity_std"],
             s["tokens_per_second_mean"], s["tokens_per_second_std"]] for s in d["summary"]]
    text = [f"topk on {d['component']} of layers {d['layers']} keeping k = fraction x {d['d_mlp']}; {d['windows']} windows of "
            f"{d['window']} tokens per seed (seeds {d['seeds']}) from {d['held_out_tokens']} held-out tokens. Fraction 1.0 differs from "
            f"the unmodified model by {d['k1_difference']:.3g} in perplexity. Every run: dynamic_k.csv."]
    return Section("Dynamic-k", text, [("Mean and std over seeds", ["fraction", "k", "perplexity", "std", "relative to unmodified", "std", "tokens/s", "std"], rows)],
                   [dynamic_k_figure(d, folder)])


def _comparison(r: dict[str, Any], folder: Path) -> Section:
    c = r["comparison"]
    _json(folder / "comparison.json", c)
    rows = [[r["names"].get(h["hook_id"], h["hook_id"]), h["mean_abs_mean_diff"], h["mean_abs_rate_diff"], h["ks_mean"], h["ks_max"],
             h["wasserstein_mean"], h["cka"]] for h in c["hooks"]]
    return Section("Comparison with another store", [f"a = {c['a']}, b = {c['b']}. KS and Wasserstein per neuron over each store's sample."],
                   [("Per layer", ["layer", "mean |Δ mean|", "mean |Δ rate|", "KS mean", "KS max", "Wasserstein mean", "CKA"], rows)],
                   [compare_figure(c, r["names"], folder)])


def write_neuron_report(results: dict[str, Any], out: Path, arguments: dict[str, Any]) -> Path:
    """One new folder under `out` with every figure and table, report.md, report.html and manifest.json."""
    folder = analysis_folder(Path(out))
    r = {k: v for k, v in results.items() if k != "_objects"}
    objects = results["_objects"]
    sections = _statistics(r, objects, folder) + [_examples(r, folder), _reverse(r, objects, folder), _polysemantic(r, folder)]
    sections += _population(r, objects, folder) + [_specialization(r, objects, folder)]
    if "dynamic_k" in r:
        sections.append(_dynamic_k(r, folder))
    if "comparison" in r:
        sections.append(_comparison(r, folder))
    _json(folder / "results.json", r)
    intro = [f"Store {r['store']}: {r['tokens']} tokens of {r['documents']} documents from {r['model']}; hooks "
             f"{', '.join(r['hooks'])}. Token strings from {r['tokenizer']}."]
    write_report(folder, "neurons", "Neuron analysis", intro, sections, model=r["model"], arguments=arguments)
    return folder
