"""Neuron-level analyses of an activation store (`mlx-engine analyze report` / `analyze neurons`).

  stats.py           per-neuron and per-layer statistics, dead / saturated neurons, sparsity
  examples.py        top-activating examples of a neuron or a direction (Neuronpedia's format, text, HTML)
  reverse.py         neuron -> tokens / n-grams, and token / n-gram -> neurons
  polysemantic.py    clusters of a neuron's top contexts, token entropy
  clustering.py      neurons clustered by co-activation (k-means, agglomerative, DBSCAN)
  projections.py     PCA / t-SNE / UMAP of token positions, PCA spectra, neuron correlations, linear CKA
  specialization.py  P(task | active), SI, the co-activation PMI graph, communities and modularity
  dynamic_k.py       perplexity and speed with the topk intervention on the MLP neurons
  compare.py         two stores: mean / rate differences, KS, Wasserstein, CKA
  report.py, report_write.py, figures.py, figures_maps.py   the report folder
  cli.py             the command line (argparse only)

(`specialization` and `dynamic_k` share their modules' names: import them from those modules.)
Every analysis reads a store through bounded blocks or samples (common.py) and returns
plain data (`to_json()` where it is an object). Names are imported on first use (PEP 562),
so importing the package (and the command line's parser) loads nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "NeuronError": "common",
    "neuron_table": "stats", "distribution": "stats", "layer_summaries": "stats",
    "top_examples": "examples", "direction_examples": "examples", "examples_text": "examples", "examples_html": "examples",
    "ngram_table": "reverse", "neuron_ngrams": "reverse", "token_neurons": "reverse",
    "polysemanticity": "polysemantic",
    "cluster_neurons": "clustering",
    "project_positions": "projections", "pca_spectrum": "projections", "linear_cka": "projections", "cka_matrix": "projections",
    "neuron_correlation": "projections",
    "task_labels": "specialization", "specialization_of_stores": "specialization",
    "pmi_graph": "specialization", "communities": "specialization",
    "compare_stores": "compare",
    "ReportOptions": "report", "neuron_report": "report", "write_neuron_report": "report_write",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlx_engine.analysis.neurons' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
