"""Activation patching (causal tracing): which sites carry what makes the clean run clean.

Meng et al. 2022 (ROME, "Locating and Editing Factual Associations in GPT") and Heimersheim &
Nanda 2024 ("How to use and interpret activation patching"): run a clean prompt and a
corrupted one, then rerun the corrupted prompt with one site restored from the clean run,
an intervention `{"op": "patch", "source": clean ActivationCache, "positions": [p]}`, and
report the recovered fraction (metric - corrupted) / (clean - corrupted): 1 where the
site alone restores the clean behaviour, 0 where it does nothing.

The corruption is a second prompt of the same length, or Gaussian noise on the embedding
at chosen positions (ROME's causal tracing: noise of 3 times the standard deviation of
the token-embedding matrix's entries, a fresh draw per position, seeded). A grid restores
each (layer, position) of a [T, d_model] component (residual by default; attention, mlp,
resid_mid), or each (layer, head) of z at all positions.
Metrics: "logit_diff" (logit(target) - logit(foil)) or "prob" (p(target)) at the position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
from scipy.special import softmax
from tqdm.auto import tqdm

from ..generation.api import run_with_cache
from ..generation.cache import ActivationCache
from ..loading import ModelKit
from .common import AnalysisError, Token, check_heads, check_layers, check_position, dense_weight, prompt_tokens, resolve_token, to_numpy, token_strings

METRICS = ("logit_diff", "prob")
TOKEN_COMPONENTS = ("residual", "attention", "mlp", "resid_mid")
NOISE_SCALE = 3.0  # ROME: 3 x the embedding's standard deviation
MIN_GAP = 1e-6  # |clean - corrupted| below this leaves nothing to recover


@dataclass
class PatchingSetup:
    """A clean run, a corruption and a metric: everything a patched run is compared with."""

    kit: ModelKit
    clean_tokens: list[int]
    corrupted_tokens: list[int]
    noise: list[dict[str, Any]]  # the embedding interventions of a noise corruption ([] for a prompt pair)
    clean: ActivationCache
    position: int
    metric: str
    target: int
    foil: Optional[int]
    clean_metric: float
    corrupted_metric: float

    def metric_of(self, logits: np.ndarray) -> float:
        row = logits[self.position]
        if self.metric == "prob":
            return float(softmax(row)[self.target])
        return float(row[self.target] - row[self.foil])

    def run(self, interventions: Sequence[dict[str, Any]] = ()) -> float:
        """The metric of the corrupted run with these interventions added (patches, ablations)."""
        cache = run_with_cache(self.kit, self.corrupted_tokens, interventions=list(self.noise) + list(interventions))
        return self.metric_of(to_numpy(cache.logits))

    def recovered(self, metric: float) -> float:
        return (metric - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    def fraction(self, interventions: Sequence[dict[str, Any]] = ()) -> float:
        """Recovered fraction of the corrupted run with these interventions: [] gives 0."""
        return self.recovered(self.run(interventions))

    def patch(self, layer: int, component: str, positions: Union[str, Sequence[int]], heads: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """The intervention restoring `component` of `layer` at `positions` (and `heads` of z) from the clean run."""
        spec: dict[str, Any] = {"layer_name": layer, "component": component, "op": "patch", "source": self.clean,
                                "positions": positions if isinstance(positions, str) else list(positions)}
        if heads is not None:
            spec["heads"] = list(heads)
        return spec


def _noise(kit: ModelKit, length: int, positions: Sequence[int], seed: int) -> list[dict[str, Any]]:
    """One `add` on the embedding per corrupted position, each its own draw of N(0, (3 sigma)^2)."""
    embed = kit.model.model
    module = next((getattr(embed, n) for n in ("embed_tokens", "wte", "embed") if hasattr(embed, n)), None)
    if module is None:
        raise AnalysisError("noise corruption needs the token-embedding matrix, which this model does not expose.")
    sigma = float(np.std(to_numpy(dense_weight(module))))
    rng = np.random.default_rng(seed)
    checked = sorted({check_position(p, length) for p in positions})
    d = kit.arch_info.d_model
    return [{"layer_name": "embedding", "component": "embedding", "op": "add", "positions": [p],
             "vector": (NOISE_SCALE * sigma * rng.standard_normal(d)).astype(np.float32)} for p in checked]


def corrupted_pair(kit: ModelKit, clean_tokens: list[int], corrupted: Union[str, Sequence[int]]) -> list[int]:
    """The corrupted prompt's tokens, refused unless it has as many tokens as the clean one."""
    corrupted_tokens = prompt_tokens(kit, corrupted)
    if len(corrupted_tokens) != len(clean_tokens):
        raise AnalysisError(
            f"the clean and corrupted prompts must have the same number of tokens: {len(clean_tokens)} vs {len(corrupted_tokens)} "
            f"({token_strings(kit, clean_tokens)} vs {token_strings(kit, corrupted_tokens)})."
        )
    return corrupted_tokens


def prepare_patching(
    kit: ModelKit,
    clean: Union[str, Sequence[int]],
    corrupted: Optional[Union[str, Sequence[int]]] = None,
    *,
    target: Optional[Token] = None,
    foil: Optional[Token] = None,
    metric: str = "logit_diff",
    position: int = -1,
    noise_positions: Optional[Sequence[int]] = None,
    seed: int = 0,
    components: Sequence[str] = ("residual",),
) -> PatchingSetup:
    """Run clean and corrupted once; `target` defaults to the clean run's top token, `foil` to the corrupted run's
    (or the clean run's second where the corrupted run also favours the target)."""
    if metric not in METRICS:
        raise AnalysisError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}.")
    clean_tokens = prompt_tokens(kit, clean)
    noise: list[dict[str, Any]] = []
    if (corrupted is None) == (noise_positions is None):
        raise AnalysisError("give either a corrupted prompt or noise_positions to corrupt, not both and not neither.")
    if corrupted is not None:
        corrupted_tokens = corrupted_pair(kit, clean_tokens, corrupted)
    else:
        corrupted_tokens = clean_tokens
        noise = _noise(kit, len(clean_tokens), noise_positions or [], seed)
        if not noise:
            raise AnalysisError("noise_positions is empty: name at least one position to corrupt.")
    p = check_position(position, len(clean_tokens))
    hooks = [{"layer_name": i, "component": c} for c in components for i in range(kit.arch_info.num_layers)]
    clean_cache = run_with_cache(kit, clean_tokens, hooks)
    corrupted_logits = to_numpy(run_with_cache(kit, corrupted_tokens, interventions=noise).logits)
    clean_logits = to_numpy(clean_cache.logits)
    t = int(np.argmax(clean_logits[p])) if target is None else resolve_token(kit, target)
    f = None
    if metric == "logit_diff":
        if foil is not None:
            f = resolve_token(kit, foil)
        else:  # the corrupted run's favourite, or the clean run's runner-up where both favour the target
            f = int(np.argmax(corrupted_logits[p]))
            f = int(np.argsort(-clean_logits[p], kind="stable")[1]) if f == t else f
        if f == t:
            raise AnalysisError(f"target and foil are the same token ({t}); give a foil for the logit difference.")
    setup = PatchingSetup(kit, clean_tokens, corrupted_tokens, noise, clean_cache, p, metric, t, f, 0.0, 0.0)
    setup.clean_metric, setup.corrupted_metric = setup.metric_of(clean_logits), setup.metric_of(corrupted_logits)
    if abs(setup.clean_metric - setup.corrupted_metric) < MIN_GAP:
        raise AnalysisError(
            f"the clean and corrupted runs give the same {metric} ({setup.clean_metric:.6g}): there is nothing to recover."
        )
    return setup


@dataclass
class PatchingResult:
    """Recovered fractions: [layers, positions] for a token component, [layers, heads] for z."""

    component: str
    layers: list[int]
    columns: list[int]  # positions, or heads for z
    column_kind: str  # "position" | "head"
    fractions: np.ndarray
    metrics: np.ndarray
    clean_metric: float
    corrupted_metric: float
    metric: str
    target: int
    foil: Optional[int]
    position: int
    clean_strings: list[str]
    corrupted_strings: list[str]
    target_string: str = ""
    foil_string: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "component": self.component, "layers": self.layers, "columns": self.columns, "column_kind": self.column_kind,
            "fractions": self.fractions.tolist(), "metrics": self.metrics.tolist(), "clean_metric": self.clean_metric,
            "corrupted_metric": self.corrupted_metric, "metric": self.metric, "target": self.target, "foil": self.foil,
            "position": self.position, "clean_strings": self.clean_strings, "corrupted_strings": self.corrupted_strings,
            "target_string": self.target_string, "foil_string": self.foil_string,
        }


def activation_patching(
    setup: PatchingSetup,
    component: str = "residual",
    *,
    layers: Optional[Sequence[int]] = None,
    positions: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> PatchingResult:
    """Restore each site of `component` from the clean run into the corrupted one (see the module docstring)."""
    kit = setup.kit
    if component not in TOKEN_COMPONENTS + ("z",):
        raise AnalysisError(f"cannot patch component {component!r}; valid: {', '.join(TOKEN_COMPONENTS + ('z',))}.")
    if not any(c.component == component for c in setup.clean.activations.values()):
        raise AnalysisError(f"the clean run did not capture {component!r}; pass components=[{component!r}] to prepare_patching.")
    rows = check_layers(kit, layers)
    length = len(setup.clean_tokens)
    if component == "z":
        columns, kind = check_heads(kit, heads), "head"
        where = "all" if positions is None else sorted({check_position(p, length) for p in positions})
        sites = [(layer, col, setup.patch(layer, "z", where, heads=[col])) for layer in rows for col in columns]
    else:
        columns, kind = list(range(length)) if positions is None else sorted({check_position(p, length) for p in positions}), "position"
        sites = [(layer, col, setup.patch(layer, component, [col])) for layer in rows for col in columns]
    metrics = np.zeros((len(rows), len(columns)))
    index = {(layer, col): (i, j) for i, layer in enumerate(rows) for j, col in enumerate(columns)}
    for layer, col, spec in tqdm(sites, desc=f"patching {component}", disable=not progress, leave=False):
        metrics[index[layer, col]] = setup.run([spec])
    return PatchingResult(
        component=component, layers=rows, columns=columns, column_kind=kind,
        fractions=(metrics - setup.corrupted_metric) / (setup.clean_metric - setup.corrupted_metric), metrics=metrics,
        clean_metric=setup.clean_metric, corrupted_metric=setup.corrupted_metric, metric=setup.metric,
        target=setup.target, foil=setup.foil, position=setup.position,
        clean_strings=token_strings(kit, setup.clean_tokens), corrupted_strings=token_strings(kit, setup.corrupted_tokens),
        target_string=token_strings(kit, [setup.target])[0], foil_string=None if setup.foil is None else token_strings(kit, [setup.foil])[0],
    )
