"""Activation stores over HTTP, read-only: the list, a hook's statistics, top examples, reverse queries,
one neuron's histogram and the ranked polysemantic neurons.

Only stores under the server's --store-root are listed or opened. A store's id is its folder
relative to that root ('run-3', 'corpus/a'), never a filesystem path: an id that is absolute,
holds '..', or resolves (symlinks followed) outside the root is answered like a missing store,
so the answer says nothing about what lies outside. Results are those of the Python functions
(mlx_engine.analysis.neurons): examples in Neuronpedia's format (`tokens`, `values`,
`maxValue`, `maxValueTokenIndex`). Reads need only numpy (and scikit-learn's clustering for the
polysemantic ranking), so they run on the request thread; the work one request may ask for is
bounded before anything runs (histogram cells, examples clustered), beyond that a 400 names the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from flask import Blueprint, Response, jsonify, request

from ...analysis.neurons.common import NeuronError, TokenText, check_hooks, check_neurons
from ...analysis.neurons.examples import top_examples
from ...analysis.neurons.polysemantic import polysemanticity
from ...analysis.neurons.reverse import neuron_ngrams, token_neurons
from ...analysis.neurons.stats import distribution, layer_summary, neuron_table
from ...store.errors import StoreError
from ...store.manifest import MANIFEST
from ...store.reader import ActivationStore
from ..errors import APIError
from ..openapi import operation
from ..schemas.research import (MAX_POLY_NEURONS, DistributionQuery, DistributionResponse, LaxQuery, PolysemanticQuery,
                                PolysemanticResponse, ReverseQuery, ReverseResponse, StoreList, StoreStatsQuery,
                                StoreStatsResponse, TopExamplesQuery, TopExamplesResponse)
from ..state import state
from .json_values import finite

bp = Blueprint("stores", __name__)
TAGS = ("Stores",)
LIST_DEPTH = 3  # folders below the root searched for stores
STORE_PATH = {"store_id": "A store id from GET /v1/stores (its folder relative to the server's --store-root)."}
MAX_HISTOGRAM_CELLS = 1 << 24  # width x (bins + 1): distribution() bins every neuron of the hook
MAX_CLUSTERED = 1 << 16  # neurons scored x examples per neuron, in one polysemantic request


def _root() -> Path:
    root = state().config.store_root
    if root is None:
        raise APIError("This server reads no activation stores: start it with --store-root DIR (the folder holding "
                       "the stores; POST /v1/extract writes new ones there).", status=404, type="not_found_error",
                       param="store_id", code="store_root_not_configured")
    return root.expanduser().resolve()


def _missing(store_id: str) -> APIError:
    return APIError(f"No activation store {store_id!r} under the server's store root; GET /v1/stores lists them.",
                    status=404, type="not_found_error", param="store_id", code="store_not_found")


def open_store(store_id: str) -> ActivationStore:
    """The store named by an id relative to the root; a 404 for anything else."""
    root = _root()
    parts = store_id.split("/")
    if "\x00" in store_id or "\\" in store_id or store_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _missing(store_id)
    path = (root / store_id).resolve()
    if root not in path.parents or not (path / MANIFEST).is_file():
        raise _missing(store_id)
    try:
        return ActivationStore.open(path)
    except (StoreError, ValueError, OSError):
        raise _missing(store_id) from None


def _describe(store_id: str, store: ActivationStore) -> dict[str, Any]:
    m = store.manifest
    model = m.get("model", {})
    return {
        "id": store_id, "object": "store", "status": m.get("status"), "model": model.get("id"),
        "model_type": model.get("model_type"), "tokens": store.num_tokens, "documents": m.get("num_documents"),
        "hooks": [{"hook": h.get("hook_id"), **{k: h.get(k) for k in ("layer", "component", "width", "dtype")}} for h in m["hooks"]],
        "top_k": m.get("stats", {}).get("top_k"), "created": m.get("timings", {}).get("created"),
    }


def list_stores(root: Path) -> list[dict[str, Any]]:
    """Every store folder under `root` (to LIST_DEPTH levels; a store's own folders are not searched)."""
    out, pending = [], [(root, 0)]
    while pending:
        folder, depth = pending.pop()
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            continue
        for child in children:
            if root not in child.resolve().parents:
                continue  # a link out of the root
            store_id = child.relative_to(root).as_posix()
            if (child / MANIFEST).is_file():
                try:
                    out.append(_describe(store_id, ActivationStore.open(child)))
                except (StoreError, ValueError, KeyError, OSError):
                    continue  # a folder being created, or not a store after all
            elif depth + 1 < LIST_DEPTH:
                pending.append((child, depth + 1))
    return sorted(out, key=lambda s: s["id"])


def _query(model: type[LaxQuery]) -> Any:
    return model.model_validate(request.args.to_dict(flat=True))


def _bad(exc: Exception, param: Optional[str], store: ActivationStore, store_id: str) -> APIError:
    """A 400 naming the store by its id: the folder's path stays on the server."""
    message = str(exc).replace(str(store.path), repr(store_id))
    return APIError(message, param=param, code="invalid_store_query")


@bp.get("/v1/stores")
@operation(summary="List the activation stores under the server's --store-root", tags=TAGS, response=StoreList,
           description="Each store's id (its folder relative to the root), status, model, hooks and size. "
           "Empty when the server has no --store-root.")
def stores() -> Response:
    root = state().config.store_root
    data = [] if root is None else list_stores(root.expanduser().resolve())
    return jsonify({"object": "list", "data": data})


@bp.get("/v1/stores/<path:store_id>/stats")
@operation(summary="A stored hook's per-neuron statistics", tags=TAGS, query=StoreStatsQuery, response=StoreStatsResponse,
           path_params=STORE_PATH,
           description="`neurons`: mlx_engine.analysis.neurons.neuron_table(store, hook).rows(), per neuron mean, std, "
           "skewness, kurtosis, min, max, frac_active, participation_ratio, mean_abs, dead (from the online statistics; "
           "non-finite values as null); `summary`: layer_summary of that table.")
def stats(store_id: str) -> Response:
    query = _query(StoreStatsQuery)
    store = open_store(store_id)
    try:
        table = neuron_table(store, query.hook)
    except (NeuronError, StoreError) as exc:
        raise _bad(exc, "hook", store, store_id) from None
    return jsonify({"object": "store.stats", "store": store_id, "hook": query.hook,
                    "summary": finite(layer_summary(table)), "neurons": finite(table.rows())})


@bp.get("/v1/stores/<path:store_id>/top_examples")
@operation(summary="A neuron's top-activating examples, in Neuronpedia's format", tags=TAGS, query=TopExamplesQuery,
           response=TopExamplesResponse, path_params=STORE_PATH,
           description="mlx_engine.analysis.neurons.top_examples(store, hook, neuron, k, context): each example's "
           "`tokens` (strings), `token_ids`, `values`, `maxValue`, `maxValueTokenIndex`, `doc`, `pos`, `row`.")
def examples(store_id: str) -> Response:
    query = _query(TopExamplesQuery)
    store = open_store(store_id)
    try:
        found = top_examples(store, query.hook, query.neuron, query.k, query.context)
    except (NeuronError, StoreError) as exc:
        raise _bad(exc, "neuron" if "neuron" in str(exc) else "hook", store, store_id) from None
    return jsonify({"object": "store.top_examples", "store": store_id, "hook": query.hook, "neuron": query.neuron,
                    "examples": finite(found)})


def _ngram(text: str) -> Any:
    """'12,40' as ids; anything else ('#12 #40', text) as token_neurons reads it."""
    parts = text.split(",")
    return [int(p) for p in parts] if all(p.strip().isdigit() for p in parts) else text


def _loaded_kit(store: ActivationStore) -> Any:
    """The loaded model the store was taken from, for tokenizing text n-grams (None if not loaded)."""
    model = state().registry.find(str(store.manifest.get("model", {}).get("id")))
    return None if model is None else model.kit


@bp.get("/v1/stores/<path:store_id>/reverse")
@operation(summary="Reverse queries: the neurons an n-gram activates, or the n-grams that activate a neuron", tags=TAGS,
           query=ReverseQuery, response=ReverseResponse, path_params=STORE_PATH,
           description="With `ngram`: mlx_engine.analysis.neurons.token_neurons(store, ngram, hooks, top=k) (mean "
           "activation and z-score per neuron, per hook; every hook unless `hook` names one). With `hook` and `neuron`: "
           "neuron_ngrams(store, hook, [neuron], n=(1..n), top=k, min_count) (the n-grams with the largest mean "
           "activation, per length). One streaming pass over the rows.")
def reverse(store_id: str) -> Response:
    query = _query(ReverseQuery)
    if (query.ngram is None) == (query.neuron is None):
        raise APIError("Give exactly one of ngram (n-gram -> neurons) and neuron (neuron -> n-grams, with hook).",
                       param="ngram", code="invalid_store_query")
    store = open_store(store_id)
    try:
        if query.ngram is not None:
            hooks = None if query.hook is None else [query.hook]
            found = token_neurons(store, _ngram(query.ngram), hooks, query.k, kit=_loaded_kit(store))
            return jsonify({"object": "store.reverse", "store": store_id, "hook": query.hook, **finite(found)})
        if query.hook is None:
            raise APIError("neuron -> n-grams needs the hook the neuron belongs to: give hook.", param="hook", code="invalid_store_query")
        table = neuron_ngrams(store, query.hook, [query.neuron], tuple(range(1, query.n + 1)), query.k, query.min_count,
                              TokenText(store, _loaded_kit(store)))
    except (NeuronError, StoreError) as exc:
        raise _bad(exc, "ngram" if query.ngram is not None else "hook", store, store_id) from None
    ngrams = {str(n): rows for n, rows in table[query.neuron].items()}
    return jsonify({"object": "store.reverse", "store": store_id, "hook": query.hook, "neuron": query.neuron, "ngrams": finite(ngrams)})


def _limit(message: str, param: str) -> APIError:
    return APIError(message, param=param, code="store_query_too_large")


@bp.get("/v1/stores/<path:store_id>/distribution")
@operation(summary="One neuron's histogram over the store's rows", tags=TAGS, query=DistributionQuery,
           response=DistributionResponse, path_params=STORE_PATH,
           description="mlx_engine.analysis.neurons.distribution(store, hook, bins=bins) read at `neuron`: `edges` "
           "(bins + 1 equal bins between the neuron's online min and max, so every row falls inside), `counts` "
           "(np.histogram of the sampled rows), `range`, the quartiles `q1`, `median`, `q3` (np.quantile, linear), "
           "`z_outliers` and `iqr_outliers` (counts), `saturation`, `sample_rows` of `total_rows` (every row unless "
           "the hook's rows exceed the function's sample bound; `exact` says which), and the online `min`, `max`, "
           f"`mean`, `std`. At most {MAX_HISTOGRAM_CELLS} histogram cells (width x (bins + 1)) per request.")
def neuron_distribution(store_id: str) -> Response:
    query = _query(DistributionQuery)
    store = open_store(store_id)
    try:
        column = int(check_neurons(store, query.hook, query.neuron)[0])
        width = store.hook_info(query.hook)["width"]
        if width * (query.bins + 1) > MAX_HISTOGRAM_CELLS:
            raise _limit(f"{query.bins} bins over the {width} neurons of {query.hook} is more than {MAX_HISTOGRAM_CELLS} "
                         f"histogram cells; ask for at most {MAX_HISTOGRAM_CELLS // width - 1} bins.", "bins")
        dist = distribution(store, query.hook, bins=query.bins)
        online = store.stats(query.hook)
    except (NeuronError, StoreError) as exc:
        raise _bad(exc, "neuron" if "neuron" in str(exc) else "hook", store, store_id) from None
    edges = dist.edges[column]
    return jsonify(finite({
        "object": "store.distribution", "store": store_id, "hook": query.hook, "layer": dist.layer, "neuron": column,
        "bins": query.bins, "edges": edges.tolist(), "counts": dist.counts[column].tolist(),
        "range": [float(edges[0]), float(edges[-1])], "q1": float(dist.quartiles[0, column]),
        "median": float(dist.quartiles[1, column]), "q3": float(dist.quartiles[2, column]),
        "z_outliers": int(dist.z_outliers[column]), "iqr_outliers": int(dist.iqr_outliers[column]),
        "saturation": float(dist.saturation[column]), "saturated": bool(dist.saturated[column]), "rule": dist.rule,
        "sample_rows": dist.sample_rows, "total_rows": dist.total_rows, "exact": dist.sample_rows == dist.total_rows,
        "min": float(online.minimum[column]), "max": float(online.maximum[column]),
        "mean": float(online.mean[column]), "std": float(online.std[column]),
    }))


@bp.get("/v1/stores/<path:store_id>/polysemantic")
@operation(summary="Neurons ranked by polysemanticity: how many kinds of context their top examples fall into", tags=TAGS,
           query=PolysemanticQuery, response=PolysemanticResponse, path_params=STORE_PATH,
           description="mlx_engine.analysis.neurons.polysemanticity(store, hook, neurons, k, distance): each neuron's "
           "top-k examples clustered by their rows' cosine distance (average linkage, cut at `distance`), ranked by "
           "`clusters`, then `token_entropy`; each row has `neuron`, `rank`, `clusters`, `token_entropy`, "
           "`distinct_tokens`, `examples` and `cluster_examples` (per cluster its size and examples). `scored` "
           f"neurons are ranked, the first `top` returned. At most {MAX_POLY_NEURONS} named neurons and "
           f"{MAX_CLUSTERED} examples clustered (neurons x k) per request.")
def polysemantic(store_id: str) -> Response:
    query = _query(PolysemanticQuery)
    neurons = query.neuron_list()
    if neurons is not None and len(neurons) > MAX_POLY_NEURONS:
        raise _limit(f"{len(neurons)} neurons named; at most {MAX_POLY_NEURONS} per request.", "neurons")
    store = open_store(store_id)
    try:
        check_hooks(store, query.hook)
        stats = store.stats(query.hook)
        scored = stats.width if neurons is None else len(neurons)
        k = stats.k if query.k is None else min(query.k, stats.k)
        if scored * k > MAX_CLUSTERED:
            raise _limit(f"{scored} neurons x {k} examples is more than {MAX_CLUSTERED} examples to cluster; name fewer "
                         f"neurons (neurons=3,17,...) or lower k.", "neurons" if query.k is None else "k")
        ranked = polysemanticity(store, query.hook, neurons, query.k, query.distance, TokenText(store, _loaded_kit(store)))
    except (NeuronError, StoreError) as exc:
        raise _bad(exc, "neurons" if "neuron" in str(exc) else "hook", store, store_id) from None
    return jsonify({"object": "store.polysemantic", "store": store_id, "hook": query.hook, "k": k, "distance": query.distance,
                    "scored": len(ranked), "neurons": finite(ranked[:query.top])})
