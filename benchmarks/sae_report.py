"""RESULTS-sae.md from a benchmarks.sae_training run's results.json: every figure comes from the run.

The sentences say which figure is which and what each trainer ran; the tables use
benchmarks/report.py's formatting, ratio and verdict helpers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import _f, _overlap, _ratio, _verdict

DECODE_TARGET = 0.9
MIB = 2**20
CODE_PATH = {
    "ours": "`mlx_engine.sae.train(store, hook, d_sae, architecture=\"topk\", ...)` on the activation store (MLX)",
    "saelens": "`sae_lens.training.sae_trainer.SAETrainer(...).fit()` on `TopKTrainingSAE` (torch CPU), "
               "data provider = our batches from the exported rows",
}
# What each trainer does by its own recipe where the two differ (read from their sources; not measured).
RECIPES = [
    ("decoder", "unit-norm rows: gradient along each row removed, rows renormalised after each step",
     "free rows initialised at norm 0.1, activations rescaled by the row norms (`rescale_acts_by_decoder_norm`)"),
    ("b_dec init", "geometric median of the normalisation rows", "zeros"),
    ("auxiliary loss", "Gao et al.'s aux-k on dead latents, norm(e - e_hat)^2 / norm(e)^2, coefficient 1/32",
     "aux-k on dead latents, norm(e - e_hat)^2 unnormalised, coefficient 1 x min(dead / k_aux, 1)"),
    ("normalisation constant", "sqrt(d_in / mean norm(x)^2) over the sampled rows", "sqrt(d_in) / mean norm(x) over the same rows"),
    ("initial weights", "numpy Generator(seed): W_dec random unit rows, W_enc = W_dec^T",
     "torch.manual_seed(seed): kaiming-uniform W_dec scaled to norm 0.1, W_enc = W_dec^T"),
]


def _training_section(r: dict[str, Any]) -> list[str]:
    s, d, t = r["settings"], r["data"], r["training"]
    lines = [
        "## Training: TopK SAE, ours against SAELens",
        "",
        f"Data: `mlx_engine.extract` of the embedded default model ({d.get('store_model')}, d_model {d['d_in']}) on the source "
        f"text of {s['modules']} standard-library modules ({d['documents']} documents, context {s['context_size']}), hook "
        f"`{s['hook']}`: {d['n_rows']:,} rows, exported to numpy. The last documents ({d['n_rows'] - d['n_train']:,} rows) "
        f"are held out; both trainers draw from the first {d['n_train']:,}.",
        "",
        f"Shared settings: d_sae {s['d_sae']}, k {s['k']}, lr {s['lr']} (Adam 0.9/0.999), linear warm-up "
        f"{s['warm_up_steps']} steps and linear decay to 0 over the last {s['decay_steps']}, batch {s['batch_size']}, "
        f"{s['steps']} steps ({s['steps'] * s['batch_size']:,} tokens), gradient norm clipped at 1, a latent dead after "
        f"{s['dead_steps']} steps without firing, seed {s['seed']}, inputs scaled to mean squared norm d_in (constant "
        "folded into the saved weights). The same batches in the same order: the driver wrote our BatchStream's indices "
        "and checked the first batch against it.",
        "",
        "| trainer | code path | tokens/s | seconds | held-out FVE | held-out L0 | dead at the end (fraction) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rec in t.items():
        if "error" in rec:
            lines.append(f"| {name} | {CODE_PATH[name]} | failed: {rec['error'][-300:]} | | | | | |")
            continue
        h = rec["heldout"]
        lines.append(f"| {name} | {CODE_PATH[name]} | {_f(rec['tokens_per_s'], 0)} | {_f(rec['seconds'], 1)} | "
                     f"{_f(h['fve'], 4)} | {_f(h['l0'], 2)} | {_f(rec['dead_fraction_training'], 3)} | "
                     f"{_f(rec['peak_rss_bytes'] / MIB, 0)} |")
    ours, theirs = t.get("ours", {}), t.get("saelens", {})
    if "tokens_per_s" in ours and "tokens_per_s" in theirs:
        lines += ["", f"Ours trains at {_f(ours['tokens_per_s'] / theirs['tokens_per_s'], 2)}x SAELens's tokens/s with "
                  f"{_f(ours['peak_rss_bytes'] / theirs['peak_rss_bytes'], 2)}x its peak resident memory; held-out FVE "
                  f"{_f(ours['heldout']['fve'], 4)} against {_f(theirs['heldout']['fve'], 4)}."]
    lines += [
        "",
        "Seconds: from the trainer's call to its return in a fresh process (imports excluded): ours includes its "
        "normalisation sample, b_dec's geometric median, its own held-out metrics and the save; SAELens's includes "
        "building the SAE, its norm estimate, the fold and `save_inference_model`. tokens/s = training tokens / seconds. "
        "FVE and L0: `benchmarks.sae_trainers.heldout_metrics`, one float64 numpy forward over both saved files "
        "(FVE = 1 - sum |x - x_hat|^2 / sum |x - mean x|^2).",
    ]
    own = ours.get("own_heldout")
    if own and "heldout" in ours:
        lines += ["", f"Cross-check: our trainer's own held-out metrics (MLX, `reconstruction_metrics`) on the same "
                  f"{own['rows']:,} rows: FVE {_f(own['fve'], 4)}, L0 {_f(own['l0'], 2)}; the numpy function: "
                  f"FVE {_f(ours['heldout']['fve'], 4)}, L0 {_f(ours['heldout']['l0'], 2)}."]
    lines += ["", "Where the two recipes differ (each trainer's own method, left as it is):", "",
              "| | ours | SAELens |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in RECIPES], ""]
    return lines


def _decode_section(r: dict[str, Any]) -> list[str]:
    d = r["decode"]
    lines = ["## Decode with SAE features streamed", ""]
    if "error" in d:
        return lines + [f"Failed: `{d['error'][-400:]}`", ""]
    off, sae = d["hooks_off"], d["sae_features"]
    ratio = _ratio(sae, off)
    lines += [
        f"{d['model']}: a TopK SAE of d_sae {d['d_sae']} ({d['d_sae'] // d['d_model']} x d_model {d['d_model']}, random "
        f"weights), k {d['k']}, attached at `layers.{d['layer']}.residual` with top_k {d['k']}; `{d['hook_id']}` captured at "
        f"every step (ids and values turned into numpy in the loop). {d['prompt_tokens']}-token prompt, {d['decode_tokens']} "
        f"greedy tokens; medians of {d['rounds']} alternating rounds in one process after a warm-up of each, [min-max] beside.",
        "",
        "| mode | decode tok/s | x hooks off | time to first token (s) |",
        "|---|---|---|---|",
        f"| hooks off (`create_generator`, no SAE attached) | {_f(off['decode_tps']['median'])} "
        f"[{_f(off['decode_tps']['min'])}-{_f(off['decode_tps']['max'])}] | 1.000 | {_f(off['ttft_s']['median'], 3)} |",
        f"| SAE attached, `sae_features` top-{d['k']} captured | {_f(sae['decode_tps']['median'])} "
        f"[{_f(sae['decode_tps']['min'])}-{_f(sae['decode_tps']['max'])}] | {_f(ratio, 3)} | {_f(sae['ttft_s']['median'], 3)} |",
        "",
        f"Target: >= {DECODE_TARGET}x hooks off: {_f(ratio, 3)}x, {_verdict(ratio, DECODE_TARGET)}"
        + (" (the rounds' ranges overlap)." if _overlap(sae, off) else "."),
        f"Same tokens in every round with and without the SAE: {d['same_tokens']} (an unedited SAE leaves the output as it "
        f"was). Captures received: {d['captures']} ({d['decode_tokens']} per round), all [positions, k] ids with values: "
        f"{d['captures_well_formed']}. Peak RSS of the process: {_f(d['peak_rss_bytes'] / MIB, 0)} MiB.",
        "",
    ]
    return lines


def _load_note(r: dict[str, Any]) -> list[str]:
    """The load averages around the run, and whether they say other work shared the CPUs."""
    start, end = r["load_average_start"], r["load_average_end"]
    cpus = int(r["machine"].get("CPU(s)") or 1)
    line = (f"Load average (1, 5, 15 min): {', '.join(_f(x) for x in start)} at the start, {', '.join(_f(x) for x in end)} "
            f"at the end, on {cpus} CPUs.")
    if not r["quick"] and max(start[0], end[0]) > cpus * 0.75:
        line += (" The measurement processes run one at a time, so load beyond one process's threads is other work: the "
                 "machine was shared during the run (under load), and absolute speeds carry that noise; the ratios come "
                 "from measurements made close together.")
    return [line, ""]


def write_sae_report(r: dict[str, Any], path: Path) -> None:
    lines = [
        "# SAE benchmarks: training against SAELens, and features streamed during decode",
        "",
        f"Generated by `{r['command']}` (run from the repository root), {r['started']} to {r['finished']}. "
        "Written by `benchmarks/sae_report.py` from `results.json` of the same run; nothing here is typed by hand.",
        "",
    ]
    if r["quick"]:
        lines += ["**Quick mode**: tiny sizes and the three processes side by side, to check the harness; these figures "
                  "say nothing about speed.", ""]
    lines += _load_note(r)
    lines += _training_section(r)
    lines += _decode_section(r)
    lines += ["## Machine and versions", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in r["machine"].items()],
              *[f"| {k} | {v} |" for k, v in r["versions"].items()], ""]
    path.write_text("\n".join(lines))
