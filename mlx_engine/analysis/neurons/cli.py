"""`mlx-engine analyze report STORE --out DIR` and `mlx-engine analyze neurons STORE --hook H ...` (parsers only).

Only argparse is imported at module level: the analyses load when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys

REPORT = """Every neuron analysis of an activation store: statistics per neuron and layer (online moments, sampled
histograms, outliers, dead and saturated neurons, sparsity), top-activating examples, reverse queries, polysemanticity,
co-activation clusters, PCA / t-SNE / UMAP projections, cross-layer correlation and CKA, specialization (with --task-field)
and PMI modularity, dynamic-k (with --held-out) and a comparison with another store (with --compare). Writes a new
timestamped folder under --out with figures (PNG, SVG, JSON, CSV), tables, report.md, report.html and manifest.json."""

NEURONS = """Query one store from the command line and print JSON: a neuron's statistics, top examples (Neuronpedia's
format) and top n-grams (--neuron), the neurons a token or n-gram activates most per layer (--token), or the top
examples of a direction read from a .npy file (--direction)."""


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _run_report(args: argparse.Namespace) -> int:
    from ...store.errors import StoreError
    from .common import NeuronError, open_store
    from .report import ReportOptions, check_options, neuron_report
    from .report_write import write_neuron_report

    options = ReportOptions(
        hooks=args.hooks, detail=args.detail, examples=args.examples, context=args.context, ngrams=tuple(args.ngrams),
        min_count=args.min_count, tokens=args.tokens, query_tokens=args.query_tokens, dead_threshold=args.dead_threshold,
        bounds=tuple(args.bounds) if args.bounds else None, n_clusters=args.clusters, projections=tuple(args.projections),
        points=args.points, task_field=args.task_field, held_out=args.held_out, fractions=tuple(args.fractions),
        seeds=tuple(args.seeds), window=args.window, windows=args.windows, compare=args.compare, max_elements=args.max_elements,
        max_neurons=args.max_neurons,
    )
    try:
        store = open_store(args.store)
        check_options(store, options)
        results = neuron_report(store, options)
    except (NeuronError, StoreError) as exc:
        return _fail(exc)
    folder = write_neuron_report(results, args.out, {k: v for k, v in vars(args).items() if k != "func"})
    print(folder)
    return 0


def _run_neurons(args: argparse.Namespace) -> int:
    from ...store.errors import StoreError
    from .common import NeuronError, TokenText, check_hooks, open_store

    try:
        store = open_store(args.store)
        check_hooks(store, args.hook)
        text = TokenText(store)
        if args.token is not None:
            from .reverse import token_neurons

            result: object = token_neurons(store, args.token, None, top=args.k)
        elif args.direction is not None:
            import numpy as np

            from .examples import direction_examples

            result = direction_examples(store, args.hook, np.load(args.direction), args.k, args.context, text)
        else:
            from .common import check_neurons
            from .examples import top_examples
            from .polysemantic import polysemanticity
            from .reverse import neuron_ngrams
            from .stats import neuron_table

            check_neurons(store, args.hook, args.neuron)
            table = neuron_table(store, args.hook).rows()
            ngrams = neuron_ngrams(store, args.hook, args.neuron, tuple(args.ngrams), top=args.k, text=text)
            poly = {p["neuron"]: p for p in polysemanticity(store, args.hook, args.neuron, text=text)}
            result = {int(n): {"statistics": table[n], "top_examples": top_examples(store, args.hook, n, args.k, args.context, text),
                               "ngrams": ngrams[n], "polysemanticity": poly[n]} for n in args.neuron}
    except (NeuronError, StoreError, OSError) as exc:
        return _fail(exc)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


def add_neuron_commands(kinds: argparse._SubParsersAction) -> None:
    """`analyze report` and `analyze neurons`, added to the `analyze` command's subparsers."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = kinds.add_parser("report", help="every neuron analysis of an activation store, written to a new folder", description=REPORT,
                         formatter_class=fmt)
    r.add_argument("store", help="an activation store folder (mlx-engine extract)")
    r.add_argument("--out", required=True, help="folder that receives one new timestamped folder per run")
    r.add_argument("--hooks", nargs="+", default=None, help="hooks to analyse (default: every hook of the store)")
    r.add_argument("--detail", type=int, default=2, help="neurons per hook shown in detail (largest peaks), plus the most polysemantic")
    r.add_argument("--examples", type=int, default=10, help="top examples per neuron shown")
    r.add_argument("--context", type=int, default=6, help="tokens of context on each side of a peak")
    r.add_argument("--ngrams", type=int, nargs="+", default=[1, 2, 3], help="n-gram lengths of the reverse queries")
    r.add_argument("--min-count", type=int, default=2, help="occurrences an n-gram (n > 1) needs to be ranked")
    r.add_argument("--tokens", nargs="+", default=None, help="tokens or n-grams to query (text, or ids as '#12 #40'); default: the most frequent tokens")
    r.add_argument("--query-tokens", type=int, default=2, help="how many of the most frequent tokens to query when --tokens is not given")
    r.add_argument("--dead-threshold", type=float, default=None, help="dead: never above this (default: the store's activity threshold)")
    r.add_argument("--bounds", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="bounds of a bounded activation (saturation near them); default: above the layer's 0.99 quantile")
    r.add_argument("--clusters", type=int, default=6, help="clusters for k-means and agglomerative clustering")
    r.add_argument("--projections", nargs="+", choices=("pca", "tsne", "umap"), default=["pca", "tsne", "umap"], help="projections drawn")
    r.add_argument("--points", type=int, default=600, help="token positions projected (shared among the projected layers)")
    r.add_argument("--task-field", default=None, help="corpus field naming each document's task ('folder': a folder corpus's subfolders)")
    r.add_argument("--held-out", nargs="+", default=None, help="held-out text files or folders: runs dynamic-k on the store's model")
    r.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0], help="dynamic-k: fractions of d_mlp kept")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="dynamic-k: seeds (each draws its windows)")
    r.add_argument("--window", type=int, default=256, help="dynamic-k: tokens per window")
    r.add_argument("--windows", type=int, default=4, help="dynamic-k: windows per seed")
    r.add_argument("--compare", default=None, help="another store to compare with (KS, Wasserstein, CKA per layer)")
    r.add_argument("--max-elements", type=int, default=1 << 24, help="values a bounded sample of rows may hold")
    r.add_argument("--max-neurons", type=int, default=2048, help="a wider hook's clusters and PMI graph cover its most active neurons only")
    r.set_defaults(func=_run_report)

    n = kinds.add_parser("neurons", help="query one store: a neuron, a token or a direction (JSON on stdout)", description=NEURONS,
                         formatter_class=fmt)
    n.add_argument("store", help="an activation store folder")
    n.add_argument("--hook", required=True, help="the hook (e.g. layers.0.mlp_post)")
    what = n.add_mutually_exclusive_group(required=True)
    what.add_argument("--neuron", type=int, nargs="+", help="neuron numbers (columns of the hook)")
    what.add_argument("--token", help="a token or n-gram: text, or ids as '#12 #40'")
    what.add_argument("--direction", help="a .npy file holding one vector of the hook's width")
    n.add_argument("--k", type=int, default=10, help="examples, n-grams or neurons per answer")
    n.add_argument("--context", type=int, default=6, help="tokens of context on each side of a peak")
    n.add_argument("--ngrams", type=int, nargs="+", default=[1, 2, 3], help="n-gram lengths")
    n.set_defaults(func=_run_neurons)
