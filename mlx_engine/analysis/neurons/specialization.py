"""Specialization and modularity: which task a neuron serves, and which neurons fire together.

Tasks label documents: a field of the corpus (`task_labels`: a .jsonl key, a parquet or
`datasets` column, or "folder", the first folder of a folder corpus's file), labels given
per document, or one store per task (`specialization_of_stores`, from each store's online
counts: no pass at all). With active = x > the store's threshold:

  P(active | task)  = active tokens of the task / tokens of the task
  P(task | active)  = P(active | task) / sum over tasks      (balanced: a uniform prior over
                      tasks, so a task with more tokens does not look preferred; with
                      balanced=False, active tokens of the task / all active tokens)
  SI                = 1 - H(P(task | active)) / log K        (scipy.stats.entropy, natural log)

SI is 0 for a neuron equally active in every task and 1 for one active in one task only;
a neuron never active has no SI (NaN).

The co-activation graph (`pmi_graph`, one streaming pass accumulating A^T A of the binary
activity matrix): PMI(i, j) = log P(i and j active) / (P(i active) P(j active)) over tokens;
the `top_edges` pairs of largest positive PMI among those active together at least
`min_count` times are the edges, weighted by PMI. Communities are networkx's Louvain
(Blondel et al. 2008; seeded) and their modularity Q is networkx's modularity (Newman 2006).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import networkx as nx
import numpy as np
import scipy.stats

from ...store.reader import ActivationStore
from .common import BLOCK_ROWS, NeuronError, check_hooks, check_neurons, hook_layer, iter_blocks

SPECIALIZED_SI = 0.5


def _corpus_path(store: ActivationStore) -> Path:
    return Path(store.manifest["corpus"]["location"])


def task_labels(store: ActivationStore, field: str = "task", labels: Optional[Union[Sequence[Any], Mapping[int, Any]]] = None) -> np.ndarray:
    """One task label (str) per stored document, from `labels` or from the corpus's `field`."""
    docs = list(store.documents())
    if labels is not None:
        if isinstance(labels, Mapping):
            missing = [d["doc"] for d in docs if d["doc"] not in labels]
            if missing:
                raise NeuronError(f"labels has no task for documents {missing[:5]} (of {len(docs)} stored).")
            return np.array([str(labels[d["doc"]]) for d in docs])
        if len(labels) != len(docs):
            raise NeuronError(f"labels gives {len(labels)} tasks for {len(docs)} stored documents.")
        return np.array([str(t) for t in labels])
    kind = store.manifest["corpus"]["kind"]
    if field == "folder":
        if kind != "folder":
            raise NeuronError(f"task field 'folder' needs a folder corpus; this store's corpus is {kind}.")
        tops = [Path(d["source"]).parts for d in docs]
        if any(len(p) < 2 for p in tops):
            raise NeuronError("task field 'folder': every file must sit in a task folder (task/file.txt).")
        return np.array([p[0] for p in tops])
    if kind == "jsonl":
        return _jsonl_labels(store, docs, field)
    if kind in ("parquet", "datasets"):
        return _column_labels(store, docs, field, kind)
    raise NeuronError(f"a {kind} corpus keeps no field {field!r}: give labels= (one task per document), "
                      "a .jsonl/parquet corpus with a task field, or one store per task.")


def _jsonl_labels(store: ActivationStore, docs: list[dict[str, Any]], field: str) -> np.ndarray:
    path = _corpus_path(store)
    if not path.exists():
        raise NeuronError(f"the store's corpus {path} is gone; give labels= instead.")
    wanted = {int(d["source"].rsplit(":", 1)[1]) for d in docs}
    found: dict[int, str] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if number in wanted:
                record = json.loads(line)
                if field not in record:
                    raise NeuronError(f"{path.name}:{number} has no task field {field!r} (fields: {', '.join(record)}).")
                found[number] = str(record[field])
    return np.array([found[int(d["source"].rsplit(":", 1)[1])] for d in docs])


def _column_labels(store: ActivationStore, docs: list[dict[str, Any]], field: str, kind: str) -> np.ndarray:
    path = _corpus_path(store)
    if kind == "parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(path).schema_arrow.names
        column = pq.read_table(path, columns=[field]).column(field).to_pylist() if field in names else None
    else:
        import datasets

        data = datasets.load_from_disk(str(path))
        names = data.column_names
        column = data[field] if field in names else None
    if column is None:
        raise NeuronError(f"{path.name} has no task column {field!r} (columns: {', '.join(names)}).")
    return np.array([str(column[int(d["source"].rsplit("[", 1)[1].rstrip("]"))]) for d in docs])


@dataclass
class Specialization:
    """Per-neuron task preference of one hook (see the module docstring)."""

    hook: str
    layer: Optional[int]
    tasks: list[str]
    tokens: np.ndarray  # [K] tokens per task
    active: np.ndarray  # [K, width] active tokens per task
    balanced: bool

    @property
    def p_task(self) -> np.ndarray:
        """P(task | active) [K, width]; NaN columns for neurons never active."""
        rate = self.active / np.maximum(self.tokens, 1)[:, None] if self.balanced else self.active.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return rate / rate.sum(axis=0, keepdims=True)

    @property
    def si(self) -> np.ndarray:
        p = self.p_task
        ok = np.isfinite(p).all(axis=0)
        out = np.full(p.shape[1], np.nan)
        if len(self.tasks) > 1 and ok.any():
            out[ok] = 1.0 - scipy.stats.entropy(p[:, ok], axis=0) / np.log(len(self.tasks))
        return out

    def rows(self) -> list[dict[str, Any]]:
        p, si = self.p_task, self.si
        top = np.nanargmax(np.nan_to_num(p, nan=-1.0), axis=0)
        return [{"hook_id": self.hook, "layer": self.layer, "neuron": i, "si": float(si[i]),
                 "top_task": self.tasks[top[i]] if np.isfinite(si[i]) else "", "p_top_task": float(p[top[i], i]),
                 **{f"p_{t}": float(p[k, i]) for k, t in enumerate(self.tasks)}} for i in range(p.shape[1])]

    def summary(self) -> dict[str, Any]:
        si = self.si
        ok = np.isfinite(si)
        return {"tasks": len(self.tasks), "neurons_with_si": int(ok.sum()),
                "si_mean": float(si[ok].mean()) if ok.any() else float("nan"),
                "si_median": float(np.median(si[ok])) if ok.any() else float("nan"),
                "specialized": int((si[ok] >= SPECIALIZED_SI).sum())}

    def to_json(self) -> dict[str, Any]:
        return {"hook_id": self.hook, "layer": self.layer, "tasks": self.tasks, "tokens": self.tokens.tolist(),
                "balanced": self.balanced, "si": [None if not np.isfinite(v) else float(v) for v in self.si], **self.summary()}


def specialization(
    store: ActivationStore, hook: str, labels: np.ndarray, balanced: bool = True, block_rows: int = BLOCK_ROWS,
) -> Specialization:
    """P(task | active) and SI of every neuron of `hook`, tasks from per-document `labels` (one pass)."""
    check_hooks(store, hook)
    labels = np.asarray(labels)
    tasks = sorted(set(labels.tolist()))
    if len(tasks) < 2:
        raise NeuronError(f"specialization needs at least two tasks; the labels hold {tasks}.")
    index = np.searchsorted(tasks, labels)
    threshold = store.stats(hook).threshold
    width = store.hook_info(hook)["width"]
    active, tokens = np.zeros((len(tasks), width), np.int64), np.zeros(len(tasks), np.int64)
    for block in iter_blocks(store, [hook], block_rows):
        if block.doc.max() >= len(index):
            raise NeuronError(f"the labels cover {len(index)} documents but the store has rows of document {int(block.doc.max())}.")
        task = index[block.doc]
        on = block.values[hook] > threshold
        tokens += np.bincount(task, minlength=len(tasks))
        for k in np.unique(task):
            active[k] += on[task == k].sum(axis=0)
    return Specialization(hook, hook_layer(store, hook), tasks, tokens, active, balanced)


def specialization_of_stores(stores: Mapping[str, ActivationStore], hook: str, balanced: bool = True) -> Specialization:
    """The same from one store per task: each store's online active counts (no pass over rows)."""
    if len(stores) < 2:
        raise NeuronError("give at least two stores, one per task.")
    states = {t: s.stats(check_hooks(s, hook)[0]) for t, s in stores.items()}
    if len({st.width for st in states.values()}) != 1 or len({st.threshold for st in states.values()}) != 1:
        raise NeuronError(f"the stores' {hook} differ in width or activity threshold; they cannot be compared.")
    tasks = list(stores)
    first = next(iter(stores.values()))
    return Specialization(hook, hook_layer(first, hook), tasks, np.array([states[t].count for t in tasks]),
                          np.stack([states[t].above for t in tasks]), balanced)


def pmi_graph(
    store: ActivationStore, hooks: Union[str, Sequence[str]], top_edges: int = 200, min_count: int = 5, block_rows: int = BLOCK_ROWS,
    neurons: Optional[Mapping[str, Sequence[int]]] = None,
) -> nx.Graph:
    """The co-activation PMI graph of the neurons of `hooks` (or only `neurons[hook]`; nodes "hook:neuron", weight PMI).

    Memory is a [neurons, neurons] matrix of counts: for a wide hook, pass a subset.
    """
    hooks = check_hooks(store, hooks)
    thresholds = [store.stats(h).threshold for h in hooks]
    chosen = {h: np.arange(store.hook_info(h)["width"]) if not neurons or h not in neurons else check_neurons(store, h, neurons[h])
              for h in hooks}
    names = [f"{h}:{i}" for h in hooks for i in chosen[h]]
    co = np.zeros((len(names), len(names)))
    n = 0
    for block in iter_blocks(store, hooks, block_rows):
        a = np.concatenate([block.values[h][:, chosen[h]] > t for h, t in zip(hooks, thresholds)], axis=1).astype(np.float32)
        co += (a.T @ a).astype(np.float64)  # exact: integer counts below 2**24 per block
        n += len(a)
    single = np.diag(co).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(co * n / np.outer(single, single))
    i, j = np.triu_indices(len(names), k=1)
    keep = (co[i, j] >= min_count) & np.isfinite(pmi[i, j]) & (pmi[i, j] > 0)
    i, j = i[keep], j[keep]
    order = np.lexsort((j, i, -pmi[i, j]))[:top_edges]
    graph = nx.Graph(hooks=list(hooks), tokens=n, min_count=min_count)
    for a, b in zip(i[order], j[order]):
        graph.add_edge(names[a], names[b], weight=float(pmi[a, b]), count=int(co[a, b]))
    return graph


def communities(graph: nx.Graph, seed: int = 0) -> dict[str, Any]:
    """Louvain communities of a weighted graph and their modularity Q (networkx), largest first."""
    if graph.number_of_edges() == 0:
        return {"communities": [], "modularity": float("nan"), "edges": 0, "nodes": graph.number_of_nodes()}
    found = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    q = nx.community.modularity(graph, found, weight="weight")
    ordered = sorted((sorted(c) for c in found), key=lambda c: (-len(c), c[0]))
    return {"communities": ordered, "modularity": float(q), "edges": graph.number_of_edges(), "nodes": graph.number_of_nodes()}


def si_modularity_row(hook: str, layer: Optional[int], spec: Optional[Specialization], found: dict[str, Any]) -> dict[str, Any]:
    """One line of si_modularity.csv: a hook's specialization summary and its PMI graph's communities."""
    base = spec.summary() if spec is not None else {"tasks": 0, "neurons_with_si": 0, "si_mean": float("nan"),
                                                     "si_median": float("nan"), "specialized": 0}
    return {"hook_id": hook, "layer": layer, **base, "specialized_si": SPECIALIZED_SI, "pmi_nodes": found["nodes"],
            "pmi_edges": found["edges"], "communities": len(found["communities"]), "modularity": found["modularity"]}
