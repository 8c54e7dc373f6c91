"""Dynamic-k: perplexity and speed of a model whose MLP keeps only its k largest neurons per token.

The `topk` intervention (interventions/ops.py: per position, the k largest |x| of the
site survive, the rest are set to 0) runs on every layer's `mlp_post` (the down
projection's input), or `expert_post` on a MoE model (each routed expert's hidden units),
with k = round(fraction x d_mlp), at least 1. k = d_mlp leaves the tensor untouched, so
fraction 1.0 reproduces the unmodified model (checked: `k1_difference`).

Held-out text is tokenized once; each seed draws `windows` windows of `window` tokens at
random offsets (numpy's default_rng(seed)), the same windows for every fraction, so the
fractions are compared on equal text. Perplexity is exp(mean next-token NLL) over the
windows' predicted positions (log-softmax by scipy.special.log_softmax in float64);
tokens/s is the windows' tokens over the forward passes' wall time (one warm-up pass
first). Each fraction's mean and (population) std are over the seeds, for perplexity, for
perplexity relative to the unmodified model on the same seed's windows (the paired change,
free of the windows' own spread) and for tokens/s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import scipy.special

from .common import NeuronError

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
SEEDS = (0, 1, 2)


def held_out_text(sources: Union[str, Path, Sequence[Union[str, Path]]]) -> str:
    """The text of held-out files: each a file, or a folder whose files are read in name order."""
    items = [sources] if isinstance(sources, (str, Path)) else list(sources)
    parts = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise NeuronError(f"held-out text {path} not found.")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not files:
            raise NeuronError(f"held-out folder {path} has no files.")
        parts += [f.read_text(encoding="utf-8") for f in files]
    text = "\n".join(parts)
    if not text.strip():
        raise NeuronError("the held-out text is empty.")
    return text


def neuron_site(kit: Any) -> tuple[str, int]:
    """The component topk acts on ('mlp_post', or 'expert_post' on MoE) and its width d_mlp."""
    points = kit.hook_points
    for component in ("mlp_post", "expert_post"):
        if f"layers.0.{component}" in points:
            width = kit.arch_info.d_mlp
            if not width:
                break
            return component, int(width)
    raise NeuronError(f"{kit.model_id} offers no mlp_post or expert_post site, so dynamic-k cannot gate its neurons.")


def _nll(kit: Any, tokens: list[int], interventions: list[dict[str, Any]]) -> tuple[float, int, float]:
    """(summed next-token NLL, predicted positions, forward seconds) of one window."""
    import mlx.core as mx

    from ...generation.api import run_with_cache

    start = time.perf_counter()
    cache = run_with_cache(kit, tokens, [], interventions=interventions or None)
    logits = np.array(cache.logits.astype(mx.float32), dtype=np.float64)
    seconds = time.perf_counter() - start
    logp = scipy.special.log_softmax(logits[:-1], axis=-1)
    targets = np.asarray(tokens[1:])
    return float(-logp[np.arange(len(targets)), targets].sum()), len(targets), seconds


def dynamic_k(
    kit: Any, text: str, fractions: Sequence[float] = FRACTIONS, seeds: Sequence[int] = SEEDS, window: int = 256,
    windows: int = 4, layers: Optional[Sequence[int]] = None,
) -> dict[str, Any]:
    """Perplexity and tokens/s per fraction of d_mlp kept (and unmodified), per seed and summarised (JSON-ready)."""
    from ...loading import tokenize

    component, width = neuron_site(kit)
    n_layers = kit.arch_info.num_layers
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    if any(not 0 <= i < n_layers for i in layers):
        raise NeuronError(f"layers {layers} out of range: the model has layers 0..{n_layers - 1}.")
    bad = [f for f in fractions if not 0.0 < float(f) <= 1.0]
    if bad or not fractions:
        raise NeuronError(f"fractions must lie in (0, 1], got {list(fractions)}.")
    tokens = tokenize(kit, text)
    if len(tokens) < 2:
        raise NeuronError("the held-out text has fewer than 2 tokens.")
    window = int(min(window, len(tokens)))
    plan = {}
    for seed in seeds:
        starts = np.random.default_rng(seed).integers(0, len(tokens) - window + 1, size=windows)
        plan[seed] = [tokens[s : s + window] for s in starts.tolist()]
    _nll(kit, plan[seeds[0]][0], [])  # warm-up: allocation and first-call costs stay out of tokens/s
    rows = []
    settings: list[tuple[Optional[float], int]] = [(None, width)] + [(float(f), max(1, int(round(f * width)))) for f in fractions]
    for fraction, k in settings:
        edits = [] if fraction is None else [{"layer_name": i, "component": component, "op": "topk", "k": k} for i in layers]
        for seed in seeds:
            nll = count = seconds = 0.0
            for w in plan[seed]:
                a, b, c = _nll(kit, w, edits)
                nll, count, seconds = nll + a, count + b, seconds + c
            rows.append({"fraction": "unmodified" if fraction is None else fraction, "k": k, "seed": seed,
                         "perplexity": float(np.exp(nll / count)), "tokens_per_second": window * len(plan[seed]) / seconds,
                         "tokens": window * len(plan[seed])})
    base = {r["seed"]: r["perplexity"] for r in rows if r["fraction"] == "unmodified"}
    for r in rows:
        r["relative_perplexity"] = r["perplexity"] / base[r["seed"]]
    summary = []
    for fraction, k in settings:
        label = "unmodified" if fraction is None else fraction
        mine = [r for r in rows if r["fraction"] == label]
        ppl, tps = np.array([r["perplexity"] for r in mine]), np.array([r["tokens_per_second"] for r in mine])
        rel = np.array([r["relative_perplexity"] for r in mine])
        summary.append({"fraction": label, "k": k, "perplexity_mean": float(ppl.mean()), "perplexity_std": float(ppl.std()),
                        "relative_perplexity_mean": float(rel.mean()), "relative_perplexity_std": float(rel.std()),
                        "tokens_per_second_mean": float(tps.mean()), "tokens_per_second_std": float(tps.std()), "seeds": len(mine)})
    full = [r for r in rows if r["fraction"] == 1.0]
    k1 = max((abs(r["perplexity"] - base[r["seed"]]) for r in full), default=None)
    return {"model": kit.model_id, "component": component, "d_mlp": width, "layers": layers, "window": window,
            "windows": windows, "seeds": list(seeds), "held_out_tokens": len(tokens), "rows": rows, "summary": summary,
            "k1_difference": k1}
