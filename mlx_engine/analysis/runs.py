"""The two analyses end to end: compute (plain-JSON results), draw, and write one new folder.

`circuits_analysis` and `weight_analysis` return the result objects (each has `to_json()`),
so an HTTP route can call them and answer with JSON; `write_circuits` and `write_weights`
turn them into a folder (figures.py, report.py), which is what `mlx-engine analyze` does.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..loading import ModelKit
from .attribution import Attribution, default_target_foil, direct_logit_attribution
from .common import Token, check_position, prompt_tokens, resolve_token, token_strings
from .figures import attribution_figures, head_figure, lens_figures, patching_figure
from .figures_weights import comparison_figure, layer_figure, spectra_figure
from .heads import head_scores
from .lens import logit_lens
from .patching import activation_patching, corrupted_pair, prepare_patching
from .report import Section, analysis_folder, write_report
from .weights import weight_report
from .weights_compare import compare_checkpoints

MATRIX_COLUMNS = ["name", "rows", "cols", "storage", "std", "abs_max", "kurtosis", "outlier_fraction", "near_zero_fraction",
                  "spectral_norm", "stable_rank", "effective_rank"]


def target_and_foil(kit: ModelKit, tokens: list[int], target: Optional[Token], foil: Optional[Token], position: int) -> tuple[int, int]:
    """The given tokens, or the model's favourites at `position`: top-1 as target, the best other token as foil."""
    first, second = default_target_foil(kit, tokens, position)
    t = first if target is None else resolve_token(kit, target)
    f = (second if t == first else first) if foil is None else resolve_token(kit, foil)
    return t, f


def circuits_analysis(
    kit: ModelKit, prompt: Union[str, Sequence[int]], *, corrupted: Optional[Union[str, Sequence[int]]] = None,
    target: Optional[Token] = None, foil: Optional[Token] = None, position: int = -1,
    noise_positions: Optional[Sequence[int]] = None, metric: str = "logit_diff", top_k: int = 5,
    repeat_length: int = 20, seed: int = 0, progress: bool = True,
) -> dict[str, Any]:
    """Logit lens, DLA, head scores and (with a corruption) activation patching of one prompt."""
    tokens = prompt_tokens(kit, prompt)
    p = check_position(position, len(tokens))
    t, f = target_and_foil(kit, tokens, target, foil, p)
    if corrupted is not None:
        corrupted = corrupted_pair(kit, tokens, corrupted)  # refuse a bad pair before the slow parts
    results: dict[str, Any] = {"tokens": tokens, "position": p, "target": t, "foil": f}
    results["lens"] = logit_lens(kit, tokens, top_k=top_k)
    results["attribution"] = direct_logit_attribution(kit, tokens, t, f, position=p)
    if kit.native:
        results["heads"] = head_scores(kit, tokens, repeat_length=repeat_length, seed=seed, importance=len(tokens) >= 2, progress=progress)
    if corrupted is not None or noise_positions is not None:
        components = ("residual", "z") if kit.native else ("residual",)
        # Patching's defaults differ from DLA's: the foil is what the corrupted run prefers.
        setup = prepare_patching(kit, tokens, corrupted, target=target, foil=foil, metric=metric, position=p,
                                 noise_positions=noise_positions, seed=seed, components=components)
        results["patching"] = [activation_patching(setup, c, progress=progress) for c in components]
    return results


def _lens_section(kit: ModelKit, lens: Any, p: int, folder: Path) -> Section:
    rows = [[name, " ".join(f"{s!r} {q:.3f}" for s, q in zip(lens.top_strings[i][p], lens.top_probs[i, p])),
             int(lens.next_rank[i, p]), float(lens.next_prob[i, p]), float(lens.kl_to_final[i, p])] for i, name in enumerate(lens.layers)]
    text = [f"Each layer's residual stream through the model's own final norm and unembedding (nostalgebraist 2020). "
            f"At position {p} ({lens.token_strings[p]!r}) the next token is {lens.next_strings[p]!r}. The last layer reproduces the "
            f"model's logits (max |difference| {lens.final_logits_max_error:.3g})."]
    table = (f"Position {p}: top tokens, the next token's rank (0 = top) and probability, KL(final || layer) in nats",
             ["layer", "top tokens", "next rank", "next prob", "KL"], rows)
    return Section("Logit lens", text, [table], lens_figures(lens, folder))


def _attribution_section(attr: Attribution, folder: Path) -> Section:
    text = [f"logit({attr.target_string!r}) - logit({attr.foil_string!r}) at position {attr.position} is {attr.total:.5g}; the "
            f"terms sum to {attr.sum_of_terms:.5g} (residual {attr.residual_error:.2g}). The final norm's scale is frozen at its value "
            "on the final residual (Elhage et al. 2021)."]
    rows = [[r["name"], r["value"]] for r in attr.terms()[:15]]
    return Section("Direct logit attribution", text, [("The largest terms", ["term", "contribution"], rows)], attribution_figures(attr, folder))


def _heads_section(scores: Any, folder: Path) -> Section:
    metrics = [m for m in ("induction", "previous_token", "duplicate_token", "importance_zero", "importance_mean", "sink_mass", "entropy")
               if scores.tables.get(m) is not None]
    ranked = {m: scores.ranked(m)[:5] for m in metrics}
    rows = [[k + 1] + [f"L{r[k]['layer']}H{r[k]['head']} {r[k]['value']:.3f}" for r in ranked.values()] for k in range(min(5, len(next(iter(ranked.values())))))]
    text = [f"Pattern scores on [BOS] + r + r for a random sequence r of {scores.repeat_length} tokens; importance is the loss "
            f"change on the prompt (clean loss {scores.clean_loss}) when a head's z is zero- or mean-ablated."]
    return Section("Attention heads", text, [("Heads ranked by each score", ["rank"] + metrics, rows)], [head_figure(scores, folder)])


def _patching_section(results: Sequence[Any], folder: Path) -> Section:
    first = results[0]
    text = [f"Metric {first.metric} at position {first.position}: clean {first.clean_metric:.5g}, corrupted {first.corrupted_metric:.5g}. "
            "Each site restored alone from the clean run; recovered fraction (metric - corrupted) / (clean - corrupted)."]
    tables = []
    for r in results:
        order = np.argsort(-r.fractions, axis=None)[:10]
        rows = [[r.layers[i // len(r.columns)], r.columns[i % len(r.columns)], float(r.fractions.flat[i])] for i in order]
        tables.append((f"{r.component}: the sites that recover most", ["layer", r.column_kind, "recovered"], rows))
    return Section("Activation patching", text, tables, [patching_figure(r, folder) for r in results])


def write_circuits(kit: ModelKit, results: dict[str, Any], out: Path, arguments: dict[str, Any]) -> Path:
    """One new folder with the circuits figures, report.md, report.html and manifest.json."""
    folder = analysis_folder(out)
    p = results["position"]
    sections = [_lens_section(kit, results["lens"], p, folder), _attribution_section(results["attribution"], folder)]
    if "heads" in results:
        sections.append(_heads_section(results["heads"], folder))
    if "patching" in results:
        sections.append(_patching_section(results["patching"], folder))
    strings = token_strings(kit, results["tokens"])
    intro = [f"Model {kit.model_id} ({kit.model_type}). Prompt: {len(strings)} tokens {strings!r}; position {p}; "
             f"target {token_strings(kit, [results['target']])[0]!r}, foil {token_strings(kit, [results['foil']])[0]!r}."]
    write_report(folder, "circuits", "Circuit analysis", intro, sections, model=kit.model_id, arguments=arguments)
    return folder


def weight_analysis(
    kit: ModelKit, *, checkpoints: Sequence[Union[str, Path]] = (), include: Optional[str] = None, progress: bool = True,
) -> dict[str, Any]:
    """Weight statistics of `kit`, and (with later checkpoints) the comparison of kit, *checkpoints in order."""
    results: dict[str, Any] = {"report": weight_report(kit, include=include)}
    if checkpoints:
        results["comparison"] = compare_checkpoints([kit, *checkpoints], include=include, progress=progress)
    return results


def write_weights(kit: ModelKit, results: dict[str, Any], out: Path, arguments: dict[str, Any]) -> Path:
    """One new folder with the weight figures and tables, report.md, report.html and manifest.json."""
    folder = analysis_folder(out)
    report = results["report"]
    table = report.table()
    (folder / "matrices.json").write_text(json.dumps(report.to_json(), indent=1))
    with open(folder / "matrices.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    rows = [[row.get(c) for c in MATRIX_COLUMNS] for row in table]
    text = ["Quantized matrices are dequantized with mx.dequantize. Outliers: |w - mean| > 6 std. Effective rank: Roy & Vetterli "
            "2007; stable rank: ||W||_F^2 / ||W||_2^2. All matrices in matrices.csv / matrices.json."]
    figures = [spectra_figure(report, folder)]
    if any(m.layer is not None for m in report.matrices):
        figures.append(layer_figure(report, folder))
    sections = [Section("Matrices", text, [("Every matrix", MATRIX_COLUMNS, rows)], figures)]
    if "comparison" in results:
        comparison = results["comparison"]
        ranked = comparison.ranked("relative_change")[:15]
        rows = [[r["matrix"], r["largest_jump_at"], r["largest_jump"], comparison.change_points[r["matrix"]]["frobenius_norm"].split_at]
                for r in ranked]
        text = ["Change points: the largest neighbour jump, and the single least-squares split of each series (Hawkins 1976)."]
        sections.append(Section("Checkpoints", text, [("Matrices by their largest relative change",
                                ["matrix", "largest change at", "relative change", "frobenius change point"], rows)],
                                [comparison_figure(comparison, folder)]))
    intro = [f"Model {kit.model_id} ({kit.model_type}): {len(report.matrices)} matrices."]
    write_report(folder, "weights", "Weight analysis", intro, sections, model=kit.model_id, arguments=arguments)
    return folder
