"""RESULTS-distributed.md from a distributed run's results.json: nothing typed by hand.

`write_distributed_report` writes a run's own Markdown (benchmarks/distributed.py calls it);
`python -m benchmarks.distributed_report RUN_DIR [--commit]` writes it again from the run's
results.json and, with --commit, copies the pair to benchmarks/RESULTS-distributed.md and
benchmarks/results-distributed.json (full runs only). Every figure and ratio comes from the
run; the sentences only say which figure is which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from .research_report import gib, machine_section, markdown_table, num

REPORT = "RESULTS-distributed.md"
OUT_MD = Path(__file__).resolve().parent / REPORT
OUT_JSON = Path(__file__).resolve().parent / "results-distributed.json"

QUICK_NOTE = ["**Quick mode**: a tiny model and tiny sizes, to check the harness; these figures say nothing about "
              "speed or memory.", ""]
WHAT_HOOKS_COST = {
    "1 rank": "no communication: the captures alone (evaluated with each step, copied to numpy)",
    "tensor": "residuals are whole on every rank (no message); the pattern's heads are all-gathered from both ranks every step",
    "pipeline": "every armed site of rank 1's blocks is sent to rank 0 and replayed there, each evaluated at once: "
                "every step waits for them",
}


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _by(r: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["mode"], c["hooks"]): c for c in r["cells"]}


def _check(c: dict[str, Any]) -> str:
    """Rank 0's comparison with the 1-rank cell of the same hooks setting (the 1-rank cell is the reference)."""
    if c["world"] == 1:
        return "reference"
    marks = []
    for key, what in (("tokens_equal_1_rank", "tokens"), ("shapes_equal_1_rank", "shapes")):
        if key in c:
            marks.append(f"{what} {'equal' if c[key] else 'DIFFER'}")
    return ", ".join(marks) or "n/a"


def cell_table(r: dict[str, Any]) -> str:
    """One line per cell: rank 0's decode tok/s and ratios, prefill and decode seconds, every rank's peak RSS."""
    rt = r["ratios"]
    out = []
    for c in r["cells"]:
        if "error" in c:
            out.append((c["label"], c["world"], c["hooks"], "failed", "", "", "", "", "", f"`{c['error'].strip()[-300:]}`"))
            continue
        vs_one = "1.00x" if c["world"] == 1 else _ratio(rt["two_ranks_over_one"][c["hooks"]].get(c["mode"]))
        vs_off = _ratio(rt["hooks_on_over_off"].get(c["mode"])) if c["hooks"] == "on" else ""
        peaks = " / ".join(gib(x.get("peak_rss_bytes")) for x in c["ranks"])
        out.append((c["label"], c["world"], c["hooks"], num(c["tokens_per_s"]), vs_one, vs_off, num(c["prefill_seconds"], 3),
                    num(c["decode_seconds"], 3), peaks, _check(c)))
    header = ["cell", "ranks", "hooks", "decode tok/s", "x 1 rank", "x hooks off", "prefill s", "decode s",
              "peak RSS GiB (rank 0 / 1)", "rank 0 against 1 rank"]
    return "\n".join(markdown_table(header, out))


def gathers_table(r: dict[str, Any]) -> str:
    """Per mode: hooks off and hooks on tok/s, their ratio, and what capturing communicates in that mode."""
    by = _by(r)
    rows = []
    for mode in ("1 rank", "tensor", "pipeline"):
        off, on = by.get((mode, "off"), {}), by.get((mode, "on"), {})
        rows.append((mode, num(off.get("tokens_per_s")), num(on.get("tokens_per_s")),
                     _ratio(r["ratios"]["hooks_on_over_off"].get(mode)), WHAT_HOOKS_COST[mode]))
    return "\n".join(markdown_table(["mode", "hooks off tok/s", "hooks on tok/s", "on / off", "what hooks on adds"], rows))


def _setup_lines(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    devices = sorted({x.get("device", "?") for c in r["cells"] for x in c["ranks"] if "device" in x})
    ranges = s.get("pipeline_ranges")
    split = f" The pipeline splits the blocks as {ranges} (rank 0 first)." if ranges else ""
    return [
        f"Model {r['model']}: {s['num_layers']} layers of {s['heads']} heads. Every job is fresh, one process per rank; "
        f"each process loads the model, warms up ({s['warmup']}), then runs one timed greedy generation of a fixed random "
        f"prompt of {s['prompt_tokens']} tokens and {s['decode_steps']} decode steps after the first token (no "
        "end-of-sequence token). Decode tok/s: steps over the seconds from the first token out to the last; the prefill "
        "(the call to the first token) is apart. The table gives rank 0's figures (every rank runs the same steps in "
        f"lockstep) and every rank's own peak RSS (VmHWM). Jobs: {s.get('jobs', 'one per cell')}.",
        "",
        f"Hooks on: every layer's `residual` ({s['num_layers']} hooks) and layer {s['pattern_layer']}'s `attention_pattern` "
        "(all heads), captured at every step through `create_generator_with_activations` and copied to numpy as a client "
        "reading the stream would; hooks off: `create_generator`." + split,
        "",
        f"Transport: {s['transport']}; devices the ranks reported: {', '.join(devices) or 'n/a'}. No NCCL and no GPU: "
        "this was a CPU run over the ring backend.",
        "",
    ]


def _against_one(x: Optional[float], more: str, less: str) -> str:
    """A ratio to the 1-rank figure in words: which side of 1 it fell on (no more is claimed)."""
    if x is None:
        return "n/a"
    return f"{x:.2f}x ({more if x >= 1 else less})"


def _memory_lines(r: dict[str, Any]) -> list[str]:
    """Each rank's peak RSS against the 1-rank process's, hooks off, and what a rank holds."""
    by = _by(r)
    one = by.get(("1 rank", "off"), {}).get("ranks", [{}])[0].get("peak_rss_bytes")
    if not one:
        return []
    parts = []
    for m in ("tensor", "pipeline"):
        peaks = [x["peak_rss_bytes"] / one for x in by.get((m, "off"), {}).get("ranks", []) if "peak_rss_bytes" in x]
        if peaks:
            parts.append(f"{m}: " + " / ".join(f"{p:.2f}x" for p in peaks))
    return ["", f"Peak RSS of each rank against the 1-rank process, hooks off (rank 0 / rank 1): {'; '.join(parts)}. "
            "A tensor rank keeps half of every split projection, a pipeline rank half of the blocks (the embedding, final "
            "norm and LM head stay on every rank), besides what every process holds (Python, MLX, the tokenizer). Below "
            "1x is the weights a rank leaves out; at or above 1x, what joining the job adds outweighs them."]


def _reading_lines(r: dict[str, Any]) -> list[str]:
    """What the numbers do and do not show; every figure named here is computed from the run."""
    rt = r["ratios"]
    cpus = r["machine"].get("CPU(s)", "?")
    two = rt["two_ranks_over_one"]["off"]
    word = ("no slower than 1 rank", "slower than 1 rank")
    lines = ["## Reading the numbers", "",
             f"This machine has {cpus} CPUs, and both ranks of every 2-rank job ran on it: two ranks share the cores one "
             "process already uses, so no speed-up from 2 ranks is expected here. Hooks off, 2-rank decode ran at "
             f"{_against_one(two.get('tensor'), *word)} under tensor and {_against_one(two.get('pipeline'), *word)} under "
             "pipeline. No gain can come from more compute on this machine: below 1x is the split's overhead (collectives "
             "or messages over loopback at every layer or step, two processes competing for the same cores); near or above "
             "1x, that overhead is lost in this machine's noise. Neither is what separate machines would give.", ""]
    same = "every cell made the same greedy tokens as the 1-rank cell, on every rank" if r["tokens_equal"] else \
        "**not every cell ran and made the 1-rank cell's tokens** (see the last column and the errors)"
    shapes = all(c.get("shapes_equal_1_rank", True) for c in r["cells"])
    failed = [c["label"] for c in r["cells"] if "error" in c]
    ran = "every job ran" if not failed else f"{len(r['cells']) - len(failed)} of {len(r['cells'])} jobs ran (failed: {', '.join(failed)})"
    lines += [f"What they do show: {ran}, {same}, and with hooks on, rank 0 of each 2-rank cell that ran "
              + ("captured the 1-rank shapes (the pattern gathered back to all heads, rank 1's blocks replayed on rank 0)."
                 if shapes else "did **not** always capture the 1-rank shapes.")]
    lines += _memory_lines(r)
    g = rt["hooks_on_over_off"]
    word = ("no slower than hooks off", "slower than hooks off")
    lines += ["", f"The cost of the gathers, hooks on over hooks off: {_against_one(g.get('1 rank'), *word)} on 1 rank "
              f"(the captures alone), {_against_one(g.get('tensor'), *word)} under tensor and "
              f"{_against_one(g.get('pipeline'), *word)} under pipeline. How far a 2-rank ratio falls below the 1-rank one "
              "is what moving the captures between ranks adds at this size.", ""]
    return lines


def write_distributed_report(r: dict[str, Any], path: Path) -> None:
    lines = ["# Distributed decode: tokens/s and peak memory per rank", "",
             f"Generated by `{r['command']}` (run from the repository root), {r['started']} to {r['finished']}. Written by "
             "`benchmarks/distributed_report.py` from `results.json` of the same run; nothing is typed by hand.", ""]
    if r.get("quick"):
        lines += QUICK_NOTE
    lines += _setup_lines(r)
    lines += ["## Every cell", "", cell_table(r), "", "## The cost of the gathers", "", gathers_table(r), ""]
    lines += _reading_lines(r)
    lines += machine_section([r])
    path.write_text("\n".join(lines))


def commit(folder: Path, md: Path = OUT_MD, js: Path = OUT_JSON) -> str:
    """Copy a full run's report and results.json to the committed pair; refuses a quick run."""
    r = json.loads((folder / "results.json").read_text())
    if r.get("quick"):
        raise SystemExit("a quick run is not committed: its figures say nothing about speed or memory")
    shutil.copyfile(folder / REPORT, md)
    shutil.copyfile(folder / "results.json", js)
    return f"{md}\n{js}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed_report", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the distributed run's folder (holding results.json)")
    p.add_argument("--commit", action="store_true", help="copy the report and results.json to benchmarks/")
    args = p.parse_args(argv)
    write_distributed_report(json.loads((args.run / "results.json").read_text()), args.run / REPORT)
    print(args.run / REPORT)
    if args.commit:
        print(commit(args.run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
