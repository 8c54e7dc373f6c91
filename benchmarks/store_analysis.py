"""Store analysis: seconds and peak memory of the neuron analyses on a store of one layer's 1024 neurons.

    python -m benchmarks.store_analysis [--tokens 1000000] [--pca-points 100000] [--out DIR]

The store is extracted for real (mlx_engine.extract, `layers.0.mlp_post`) from a one-layer
synthetic llama whose MLP is 1024 wide (hidden 256: the forward is cheap, so a million
tokens of real text are a matter of minutes), over the standard-library corpus of
research_runs.py. Then each analysis runs in a fresh process on the finished store, so its
peak RSS (VmHWM) is its own, beside the store's size on disk:

  statistics         analysis.neurons.stats: neuron_table and layer_summary (the online state, no pass over rows)
  top examples       analysis.neurons.examples.top_examples of 16 neurons, 20 each with context
  distribution       analysis.neurons.stats.distribution: every neuron's histogram, quartiles, outliers (bounded sample)
  PCA                projections.embed(..., "pca") of --pca-points sampled positions x 1024 (sample_rows bounded to them)
  project_positions  projections.project_positions(points=--pca-points): the API as a caller reaches it
  clustering         clustering.cluster_neurons, k-means of the 1024 neurons by co-activation

results.json and RESULTS-store-analysis.md go to a new timestamped folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .checkpoints import QUICK_MODELS, ModelSpec, ensure_synth
from .machine import machine_summary
from .research_runs import child_main, folder_bytes, research_versions, run_task, timed_task, write_corpus

SPEC = ModelSpec("llama-1layer-mlp1024-f32", "llama-125m", "float32", layers=1,
                 overrides={"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 4})
HOOK = "layers.0.mlp_post"
EXAMPLE_NEURONS = 16
EXAMPLES_K = 20
CLUSTERS = 16


def _build(task: dict[str, Any]) -> dict[str, Any]:
    import mlx_engine

    kit = mlx_engine.load_model(task["model"])

    def run() -> dict[str, Any]:
        store = mlx_engine.extract(kit, task["corpus"], [HOOK], task["store"], context_size=task["context"],
                                   batch_size=task["batch"], max_tokens=task["tokens"], progress=False)
        return {"tokens": store.num_tokens, "store_bytes": folder_bytes(store.path), "shards": len(store.manifest["shards"]),
                "width": store.hook_info(HOOK)["width"]}

    out = timed_task(run)
    return {"label": "build the store (extract)", **out, "tokens_per_s": out["tokens"] / out["seconds"]}


def _statistics(store: Any, task: dict[str, Any]) -> dict[str, Any]:
    from mlx_engine.analysis.neurons.stats import layer_summary, neuron_table

    table = neuron_table(store, HOOK)
    summary = layer_summary(table)
    return {"what": f"{table.width} neurons over {table.count:,} tokens from the online state: {summary['dead']} dead, "
                    f"fraction active {summary['frac_active']:.3f}"}


def _top_examples(store: Any, task: dict[str, Any]) -> dict[str, Any]:
    from mlx_engine.analysis.neurons.examples import top_examples

    found = [len(top_examples(store, HOOK, n, k=EXAMPLES_K)) for n in range(EXAMPLE_NEURONS)]
    return {"what": f"{EXAMPLE_NEURONS} neurons, {sum(found)} examples (of the online top-{EXAMPLES_K}), 8 positions of context each"}


def _distribution(store: Any, task: dict[str, Any]) -> dict[str, Any]:
    from mlx_engine.analysis.neurons.stats import distribution

    d = distribution(store, HOOK)
    return {"what": f"{d.counts.shape[0]} histograms of {d.counts.shape[1]} bins, quartiles and outliers over "
                    f"{d.sample_rows:,} sampled rows (of {d.total_rows:,})"}


def _pca(store: Any, task: dict[str, Any]) -> dict[str, Any]:
    from mlx_engine.analysis.neurons.common import sample_rows
    from mlx_engine.analysis.neurons.projections import embed

    width = store.hook_info(HOOK)["width"]
    sample = sample_rows(store, [HOOK], max_elements=task["points"] * width)
    x = sample.values[HOOK]
    _, info = embed(x, "pca")
    ratio = info["explained_variance_ratio"]
    return {"what": f"{x.shape[0]:,} positions x {x.shape[1]} to 2-D; explained variance {ratio[0]:.3f}, {ratio[1]:.3f}",
            "points": int(x.shape[0])}


def _project_positions(store: Any, task: dict[str, Any]) -> dict[str, Any]:
    from mlx_engine.analysis.neurons.projections import project_positions

    p = project_positions(store, [HOOK], "pca", points=task["points"])
    capped = len(p.row) < min(task["points"], store.num_tokens)
    note = " (project_positions passes no max_elements: sample_rows' default bound of 2**24 values caps the rows)" if capped else ""
    return {"what": f"asked for {task['points']:,} points, projected {len(p.row):,}{note}", "points": int(len(p.row))}


def _clustering(store: Any, task: dict[str, Any]) -> dict[str, Any]:
    from mlx_engine.analysis.neurons.clustering import cluster_neurons

    c = cluster_neurons(store, [HOOK], "kmeans", n_clusters=CLUSTERS)
    sil = "n/a" if c.silhouette is None else f"{c.silhouette:.3f}"
    return {"what": f"k-means, {CLUSTERS} clusters of {len(c.labels)} neurons by co-activation over {c.sample_rows:,} sampled "
                    f"rows; silhouette {sil}"}


ANALYSES: dict[str, tuple[str, Callable[[Any, dict[str, Any]], dict[str, Any]]]] = {
    "statistics": ("statistics (neuron_table, layer_summary)", _statistics),
    "top_examples": ("top examples", _top_examples),
    "distribution": ("distribution", _distribution),
    "pca": ("PCA (embed, pca)", _pca),
    "project_positions": ("project_positions (pca)", _project_positions),
    "clustering": ("clustering (cluster_neurons, kmeans)", _clustering),
}


def measure(task: dict[str, Any]) -> dict[str, Any]:
    if task["kind"] == "build":
        return _build(task)
    from mlx_engine.store.reader import ActivationStore

    label, fn = ANALYSES[task["kind"]]
    store = ActivationStore.open(task["store"])
    return {"kind": task["kind"], "label": label, **timed_task(lambda: fn(store, task))}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.store_analysis", description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a small store, measured in this process: checks the harness only")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens in the store")
    p.add_argument("--pca-points", type=int, default=100_000, help="positions the PCA projects")
    p.add_argument("--context", type=int, default=256, help="tokens per window")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass")
    p.add_argument("--keep-store", action="store_true", help="keep the store in the run folder (default: delete it at the end)")
    p.add_argument("--work", type=Path, default=Path("benchmarks/.cache"), help="where the checkpoint is written")
    p.add_argument("--out", type=Path, default=Path("benchmarks/.cache/runs"), help="a new timestamped folder is made here")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one measurement may take")
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, measure)
    if args.quick:
        args.tokens, args.pca_points, args.context, args.batch = 2048, 1000, 128, 8
    results = run(args, argv)
    from .research_report import store_table

    print(store_table(results))
    print(results["folder"])
    return 0


def run(args: argparse.Namespace, argv: Optional[list[str]]) -> dict[str, Any]:
    from .research_report import write_store_report

    spec = QUICK_MODELS[0] if args.quick else SPEC  # quick: the 2-layer model of the other quick runs, MLP 512 wide
    mlx_dir = ensure_synth(spec, args.work)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()  # before any measurement: other work's load alone
    folder = args.out / time.strftime("store-analysis-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    corpus = write_corpus(folder / "corpus.jsonl", args.tokens)
    base = {"model": str(mlx_dir), "corpus": str(folder / "corpus.jsonl"), "store": str(folder / "store"), "tokens": args.tokens,
            "points": args.pca_points, "context": args.context, "batch": args.batch}
    build = run_task("store_analysis", {**base, "kind": "build", "label": "build the store (extract)"}, measure, args.quick, args.timeout)
    print(f"{'build':<40} " + (build.get("error") or f"{build['tokens']:,} tokens, {build['tokens_per_s']:.0f} tok/s, "
                                                        f"store {build['store_bytes'] / 2**30:.2f} GiB"), flush=True)
    rows = []
    if "error" not in build:
        for kind in ANALYSES:
            row = run_task("store_analysis", {**base, "kind": kind, "label": ANALYSES[kind][0]}, measure, args.quick, args.timeout)
            rows.append(row)
            print(f"{row.get('label', kind):<40} " + (row.get("error") or f"{row['seconds']:.2f} s, peak {row['peak_rss_bytes'] / 2**30:.2f} GiB"), flush=True)
    if not args.keep_store:
        import shutil

        shutil.rmtree(folder / "store", ignore_errors=True)
    results = {
        "benchmark": "store_analysis", "quick": args.quick, "model": spec.label + ("" if args.quick else " (hidden 256, MLP 1024)"), "model_key": spec.key,
        "command": "python -m benchmarks.store_analysis " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "settings": {"tokens": args.tokens, "pca_points": args.pca_points, "context_size": args.context, "batch_size": args.batch,
                     "hook": HOOK, "width": build.get("width"), "dtype": "float32",
                     "built_by": "mlx_engine.extract over the corpus (real activations, not written by hand)"},
        "corpus": corpus, "machine": machine_summary(), "versions": research_versions(), "build": build, "rows": rows,
        "in_process": args.quick,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    write_store_report(results, folder / "RESULTS-store-analysis.md")
    results["folder"] = str(folder)
    return results


if __name__ == "__main__":
    sys.exit(main())
