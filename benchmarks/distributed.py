"""Distributed decode: tokens/s and peak memory per rank, 1 and 2 ranks, tensor and pipeline, hooks off and on.

    python -m benchmarks.distributed [--prompt-tokens 128] [--tokens 64] [--quick] [--out DIR] [--commit]

Cells: {1 rank (a plain load), 2 ranks tensor, 2 ranks pipeline} x {hooks off, hooks on}.
Hooks off is `create_generator`; hooks on is `create_generator_with_activations` capturing
every layer's `residual` and one middle layer's `attention_pattern` (all heads) at every
step, each capture copied to numpy as a client reading the stream would. Every cell is a
fresh job: one process (1 rank) or two (MLX_RANK and MLX_HOSTFILE, ring backend over
127.0.0.1, ports found free by binding port 0), so each peak resident set (VmHWM) is that
rank's own (--quick runs both hooks settings in each job, hooks off first: half the process
starts; its figures say nothing anyway). Each process loads, warms up on one short
generation, then runs the timed one: greedy, a fixed random prompt of --prompt-tokens
tokens, --tokens decode steps after the first token, no end-of-sequence token (random
weights). Decode tok/s counts the steps from the first token out to the last token out;
the prefill (call to first token) is reported apart. Rank 0 of a 2-rank cell checks its
tokens against the 1-rank cell's (greedy: they must be identical) and, hooks on, its
captures' shapes; the result records both.

The cost of the gathers: hooks-on over hooks-off tok/s in each mode (tensor gathers the
pattern's heads from both ranks at every step; pipeline sends every armed site of rank 1's
blocks to rank 0, which makes each step synchronous), and 2-rank over 1-rank tok/s.
results.json and RESULTS-distributed.md (distributed_report.py, written from results.json)
go to a new timestamped folder; --commit copies them to benchmarks/RESULTS-distributed.md
and benchmarks/results-distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .checkpoints import QUICK_MODELS, ModelSpec, ensure_synth
from .extraction import free_ports
from .machine import machine_summary, versions
from .research_runs import answer, child_main, timed_task

SPEC = ModelSpec("llama-125m-f32", "llama-125m", "float32")
QUICK_SPEC = QUICK_MODELS[0]
# (cell mode, parallel= for load_model, ranks)
MODES = (("1 rank", None, 1), ("tensor", "tensor", 2), ("pipeline", "pipeline", 2))
HOOKS = ("off", "on")
WARMUP_PROMPT, WARMUP_TOKENS = 8, 4
PROMPT_SEED = 0
FAILED_PEER_GRACE_S = 10.0  # a rank whose peer exited with an error is waiting in a collective that never returns


def prompt_tokens(vocab_size: int, n: int) -> list[int]:
    """A fixed random prompt: the same tokens in every cell and every run of the same size."""
    return [int(t) for t in np.random.default_rng(PROMPT_SEED).integers(3, vocab_size, size=n)]


def hook_specs(num_layers: int) -> list[dict[str, Any]]:
    """Every layer's residual and the middle layer's attention pattern (all heads)."""
    return [{"layer_name": i, "component": "residual"} for i in range(num_layers)] + [
        {"layer_name": num_layers // 2, "component": "attention_pattern"}]


def cell_label(mode: str, hooks: str) -> str:
    return f"{mode if mode == '1 rank' else mode + ', 2 ranks'}, hooks {hooks}"


# ---- the child: one rank of one cell ----------------------------------------------------


def _stream(kit: Any, prompt: list[int], max_tokens: int, hooks: Optional[list[dict[str, Any]]]) -> Iterable[tuple[Any, dict]]:
    """(result, activations) pairs: hooks off through create_generator (no capture loop armed at all)."""
    import mlx_engine

    if hooks is None:
        return ((r, {}) for r in mlx_engine.create_generator(kit, prompt, max_tokens=max_tokens, temp=0.0))
    return mlx_engine.create_generator_with_activations(kit, prompt, hooks, max_tokens=max_tokens, temp=0.0)


def timed_generation(kit: Any, prompt: list[int], max_tokens: int, hooks: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
    """One generation: prefill seconds, decode tok/s from first to last token out, tokens, capture shapes."""
    stamps, tokens, captured, nbytes = [], [], 0, 0
    shapes: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for result, activations in _stream(kit, prompt, max_tokens, hooks):
        for hook_id, captures in activations.items():
            for c in captures:
                data = np.asarray(c.array)  # what a client reading the stream pays for
                nbytes += data.nbytes
                captured += 1
                entry = shapes.setdefault(hook_id, {"prefill": list(data.shape), "steps": 0})
                entry["last_decode"] = list(data.shape)
                entry["steps"] += 1
        stamps.append(time.perf_counter())
        tokens.append(int(result.token))
    steps = len(stamps) - 1
    decode = stamps[-1] - stamps[0]
    out = {"prefill_seconds": stamps[0] - t0, "decode_seconds": decode, "decode_steps": steps, "tokens_per_s": steps / decode,
           "token_ids": tokens}
    if hooks is not None:  # hooks off captures nothing: no zero figures
        out.update(captures=captured, capture_bytes=nbytes, shapes=shapes)
    return out


def check_against_one_rank(out: dict[str, Any], expect: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 of a 2-rank cell: its greedy tokens (and, hooks on, capture shapes) must equal the 1-rank cell's."""
    checks: dict[str, Any] = {}
    if expect.get("token_ids") is not None:
        checks["tokens_equal_1_rank"] = out["token_ids"] == expect["token_ids"]
    if expect.get("shapes") is not None:
        checks["shapes_equal_1_rank"] = out["shapes"] == expect["shapes"]
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        checks["error"] = f"rank 0 differs from the 1-rank cell: {', '.join(failed)}"
    return checks


def _rank(task: dict[str, Any]) -> dict[str, Any]:
    """Join the job (2 ranks: ring backend), load, then per hooks setting of the task: warm up, run the timed generation."""
    import mlx.core as mx  # after mlx_engine (imported with .checkpoints), which binds MLX's CPU backend to its BLAS

    import mlx_engine

    group = mx.distributed.init(backend="ring", strict=True) if task["world"] > 1 else None
    t = time.perf_counter()
    kit = mlx_engine.load_model(task["model"], parallel=task["parallel"])
    load = time.perf_counter() - t
    kit.tokenizer.eos_token_ids = []  # random weights: every cell makes the same number of tokens
    prompt = prompt_tokens(int(kit.config["vocab_size"]), task["prompt_tokens"])
    rank = group.rank() if group is not None else 0
    runs = {}
    for setting in task["hooks"]:
        hooks = hook_specs(kit.arch_info.num_layers) if setting == "on" else None
        timed_generation(kit, prompt[:WARMUP_PROMPT], WARMUP_TOKENS, hooks)  # warm-up, not timed
        runs[setting] = timed_generation(kit, prompt, task["decode_steps"] + 1, hooks)
        if rank == 0 and task["world"] > 1:
            runs[setting].update(check_against_one_rank(runs[setting], task["expect"].get(setting) or {}))
    return {"rank": rank, "world": group.size() if group is not None else 1, "load_seconds": load,
            "device": str(mx.default_device()), "backend": "ring" if group is not None else "none", "runs": runs}


def measure(task: dict[str, Any]) -> dict[str, Any]:
    return {"label": task["label"], **timed_task(lambda: _rank(task))}


# ---- the driver: one job per cell -------------------------------------------------------


def _env(rank: Optional[int], hostfile: Optional[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if rank is not None and hostfile is not None:
        env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
    return env


def wait_all(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait for every process, at most `timeout` s (less once one fails: its peers would wait forever); all exited?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return True
        if any(c not in (None, 0) for c in codes):
            deadline = min(deadline, time.monotonic() + FAILED_PEER_GRACE_S)
        time.sleep(0.1)
    return False


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill whatever is still running, and reap it (bounded)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def run_job(task: dict[str, Any], logs: Path, timeout: float) -> list[dict[str, Any]]:
    """One cell as a job of task["world"] fresh processes; each rank's answer (or its error)."""
    world, name = task["world"], task["label"].replace(", ", "-").replace(" ", "-")
    hostfile = None
    if world > 1:
        hostfile = logs / f"{name}-hosts.json"
        hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(world)]))
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--child", json.dumps(task)]
    procs, files, handles = [], [], []
    finished = False
    try:
        for r in range(world):
            out, err = logs / f"{name}-rank{r}.out", logs / f"{name}-rank{r}.err"
            files.append((out, err))
            handles += [open(out, "w"), open(err, "w")]
            procs.append(subprocess.Popen(cmd, stdout=handles[-2], stderr=handles[-1], env=_env(r if world > 1 else None, hostfile)))
        finished = wait_all(procs, timeout)
    finally:  # an error or an interrupt here leaves no rank behind
        stop(procs)
        for h in handles:
            h.close()
    ranks = []
    for r, (p, (out, err)) in enumerate(zip(procs, files)):
        row = answer(task, p.returncode if p.returncode is not None else -9, out.read_text(), err.read_text())
        if not finished and "error" in row:
            row["error"] = f"the job ran past {timeout:.0f} s and was killed; {row['error']}"
        ranks.append({"rank": r, **row})
    return ranks


def rank_rows(ranks: list[dict[str, Any]], hooks: str) -> list[dict[str, Any]]:
    """Each rank's answer for one hooks setting: its run of that setting beside the process's own figures."""
    out = []
    for r in ranks:
        runs = r.get("runs") or {}
        row = {k: v for k, v in r.items() if k != "runs"}
        if "error" not in row and hooks not in runs:
            row["error"] = f"no hooks-{hooks} run in the answer"
        out.append({**row, **runs.get(hooks, {})})
    return out


def cell(mode: str, parallel: Optional[str], world: int, hooks: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's row: rank 0's timings and tokens, every rank's own peak RSS and tok/s."""
    ranks = rank_rows(ranks, hooks)
    row: dict[str, Any] = {"label": cell_label(mode, hooks), "mode": mode, "parallel": parallel, "world": world,
                           "hooks": hooks, "ranks": ranks}
    errors = [f"rank {r['rank']}: {r['error']}" for r in ranks if "error" in r]
    if errors:
        row["error"] = "; ".join(errors)
    lead = ranks[0]
    for key in ("tokens_per_s", "prefill_seconds", "decode_seconds", "decode_steps", "token_ids", "captures",
                "capture_bytes", "shapes", "tokens_equal_1_rank", "shapes_equal_1_rank", "backend", "device"):
        if key in lead:
            row[key] = lead[key]
    if all("token_ids" in r for r in ranks):
        row["ranks_agree"] = all(r["token_ids"] == lead["token_ids"] for r in ranks)
    return row


def ratios(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Hooks-on over hooks-off tok/s per mode (the gathers' cost), and 2-rank over 1-rank tok/s per hooks setting."""
    tps = {(c["mode"], c["hooks"]): c.get("tokens_per_s") for c in cells if "error" not in c}

    def ratio(a: Any, b: Any) -> Optional[float]:
        return a / b if a and b else None

    return {"hooks_on_over_off": {m: ratio(tps.get((m, "on")), tps.get((m, "off"))) for m, _, _ in MODES},
            "two_ranks_over_one": {h: {m: ratio(tps.get((m, h)), tps.get(("1 rank", h))) for m, _, w in MODES if w > 1}
                                   for h in HOOKS}}


def run_cells(base: dict[str, Any], logs: Path, timeout: float, groups: tuple[tuple[str, ...], ...]) -> list[dict[str, Any]]:
    """Every cell, one job per mode and group of hooks settings, the 1-rank job first (rank 0 checks against it)."""
    cells = []
    for group in groups:
        reference: dict[str, dict[str, Any]] = {}
        for mode, parallel, world in MODES:
            name = cell_label(mode, "+".join(group))
            task = {**base, "kind": "decode", "label": name, "parallel": parallel, "world": world, "hooks": list(group),
                    "expect": {h: {"token_ids": c.get("token_ids"), "shapes": c.get("shapes")} for h, c in reference.items()}}
            ranks = run_job(task, logs, timeout)
            for hooks in group:
                row = cell(mode, parallel, world, hooks, ranks)
                if world == 1 and "error" not in row:
                    reference[hooks] = row
                cells.append(row)
                print(f"{row['label']:<32} " + (row.get("error") or f"{row['tokens_per_s']:.1f} tok/s, peak "
                      + ", ".join(f"{r['peak_rss_bytes'] / 2**30:.2f}" for r in row["ranks"]) + " GiB"), flush=True)
    modes = [m for m, _, _ in MODES]
    return sorted(cells, key=lambda c: (HOOKS.index(c["hooks"]), modes.index(c["mode"])))


def tokens_equal(cells: list[dict[str, Any]]) -> bool:
    """Every cell ran and made the tokens of the 1-rank, hooks-off cell."""
    ids = [c.get("token_ids") for c in cells]
    return bool(ids) and ids[0] is not None and all(i == ids[0] for i in ids) and all(c.get("ranks_agree") for c in cells)


def run(args: argparse.Namespace, argv: Optional[list[str]]) -> dict[str, Any]:
    """Every cell of one run; results.json and RESULTS-distributed.md in a new folder."""
    from .distributed_report import write_distributed_report

    spec = QUICK_SPEC if args.quick else SPEC
    model = ensure_synth(spec, args.work)
    config = json.loads((model / "config.json").read_text())
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()  # before any job: other work's load alone
    folder = args.out / time.strftime("distributed-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    logs = folder / "logs"
    logs.mkdir()
    base = {"model": str(model), "prompt_tokens": args.prompt_tokens, "decode_steps": args.tokens}
    # Quick mode runs both hooks settings in each job (half the process starts); a full run, one job per cell.
    groups = (HOOKS,) if args.quick else tuple((h,) for h in HOOKS)
    cells = run_cells(base, logs, args.timeout, groups)
    layers = int(config["num_hidden_layers"])
    from mlx_engine.distributed.pipeline import split_layers

    results = {
        "benchmark": "distributed", "quick": args.quick, "model": spec.label, "model_key": spec.key,
        "command": "python -m benchmarks.distributed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "settings": {"prompt_tokens": args.prompt_tokens, "decode_steps": args.tokens, "temperature": 0.0,
                     "warmup": f"one generation of {WARMUP_TOKENS} tokens from the prompt's first {WARMUP_PROMPT}",
                     "num_layers": layers, "pattern_layer": layers // 2, "hooks_on": hook_specs(layers),
                     "heads": config.get("num_attention_heads"),
                     "jobs": "one per mode, hooks off then on in the same processes" if args.quick else "one per cell",
                     "pipeline_ranges": [list(x) for x in split_layers(layers, 2)], "transport": "MLX ring backend over 127.0.0.1 (mlx CPU)"},
        "machine": machine_summary(), "versions": versions(), "cells": cells, "ratios": ratios(cells),
        "tokens_equal": tokens_equal(cells),
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    write_distributed_report(results, folder / "RESULTS-distributed.md")
    results["folder"] = str(folder)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a tiny model, 16 prompt tokens, 8 steps: checks the harness only")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens of the fixed prompt")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed after the first token")
    p.add_argument("--work", type=Path, default=Path("benchmarks/.cache"), help="where the checkpoints are written")
    p.add_argument("--out", type=Path, default=Path("benchmarks/.cache/runs"), help="a new timestamped folder is made here")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one cell (one job) may take")
    p.add_argument("--commit", action="store_true", help="copy the report and results.json to benchmarks/ (full runs only)")
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, measure)
    if args.quick:
        if args.commit:
            p.error("--commit takes a full run: quick figures say nothing about speed or memory")
        args.prompt_tokens, args.tokens, args.timeout = 16, 8, min(args.timeout, 120.0)
    results = run(args, argv)
    from .distributed_report import cell_table, commit

    print(cell_table(results))
    print(results["folder"])
    if args.commit:
        print(commit(Path(results["folder"])))
    return 0 if all("error" not in c for c in results["cells"]) and results["tokens_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
