"""Batched decode without a server: aggregate tokens/s of B rows decoded together, ours and mlx-lm's.

    python -m benchmarks.batch_decode [--batches 1 2 4 8] [--tokens 48] [--prompt-tokens 64] [--quick] [--out DIR]

The server's concurrency figure (benchmarks/concurrency.py) mixes the engine with HTTP,
SSE and the clients' own threads on the same cores. This measures the engine alone: B
prompts are prefilled, then decoded together until each has `--tokens` tokens, and the
figure is every token after the last row's first one over the wall time from then to the
end (decode only, aggregate over the rows). Ours: `generation.batch` (BatchDecoder rows,
as the server runs them); mlx-lm: its `BatchGenerator` (what its server batches with),
greedy, on the same folder and prompts. Both stop only at `--tokens` (no EOS).

Models: the embedded default model (gpt-oss, 4-bit: small enough that its weights sit in
the CPU's caches) and the synthetic llama-125m float32 (about 0.5 GB of weights read per
step). On a CPU a batched step costs more the more rows it carries once the weights are
no longer the bottleneck, so the two bound what batching can give here. One child
process per model, all its cells in turn after a warm-up.

results.json and RESULTS-batch-decode.md go to a new timestamped folder; `--commit`
copies them to benchmarks/RESULTS-batch-decode.md and results-batch-decode.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from .checkpoints import QUICK_MODELS, ModelSpec, ensure_synth
from .concurrency import WORDS
from .machine import machine_summary, versions

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "mlx_engine" / "default_model"
LLAMA = ModelSpec("llama-125m-f32", "llama-125m", "float32")


def prompts(kit: Any, count: int, length: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` tokens (rotated word lists)."""
    from mlx_engine.loading import tokenize

    out = []
    for i in range(count):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(length * 2))
        out.append(list(tokenize(kit, words, add_special_tokens=False))[:length])
    return out


def ours(kit: Any, batch: list[list[int]], tokens: int) -> dict[str, Any]:
    """Our BatchDecoder: rows prefilled one by one (as the server does), then decoded together."""
    from mlx_engine.generation.batch import BatchDecoder, start_row

    decoder = BatchDecoder(kit)
    counts = [0]

    def on_step(result: Any, activations: Any) -> bool:
        counts[0] += 1
        return False

    t0 = time.perf_counter()
    for prompt in batch:
        row, _first = start_row(kit, prompt, [], [], max_tokens=tokens, temp=0.0)
        decoder.join(row, on_step, lambda error: None)
    started = time.perf_counter()
    while len(decoder):
        decoder.step()
    end = time.perf_counter()
    return {"prefill_s": started - t0, "decode_s": end - started, "decode_tokens": counts[0], "largest_batch": decoder.largest}


def mlx_lm(model: Any, batch: list[list[int]], tokens: int) -> dict[str, Any]:
    """mlx-lm's own model and BatchGenerator: prefill batched inside it; timed from the last row's first token."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=tokens, stop_tokens=[], completion_batch_size=len(batch),
                         prefill_batch_size=len(batch))
    t0 = time.perf_counter()
    gen.insert(batch, [tokens] * len(batch))
    seen: set[int] = set()
    started: Optional[float] = None
    after = 0
    while responses := gen.next_generated():
        for r in responses:
            if started is not None:
                after += 1
            elif r.uid in seen:
                raise RuntimeError("a row's second token came before every row's first")
            seen.add(r.uid)
        if started is None and len(seen) == len(batch):
            started = time.perf_counter()
    end = time.perf_counter()
    gen.close()
    assert started is not None
    return {"prefill_s": started - t0, "decode_s": end - started, "decode_tokens": after}


def child(task: dict[str, Any]) -> dict[str, Any]:
    """All cells of one model in this process: a warm-up, then each batch size, ours then mlx-lm."""
    from mlx_lm import load as mlx_lm_load

    import mlx_engine

    kit = mlx_engine.load_model(task["model"])
    kit.tokenizer.eos_token_ids = []  # every row runs its full length
    peer, _ = mlx_lm_load(task["model"])
    pool = prompts(kit, max(task["batches"]), task["prompt_tokens"])
    ours(kit, pool[:2], 4)
    mlx_lm(peer, pool[:2], 4)
    cells = []
    for b in task["batches"]:
        for name, fn, model in (("ours", ours, kit), ("mlx-lm", mlx_lm, peer)):
            r = fn(model, pool[:b], task["tokens"])
            r.update(contender=name, batch=b, tokens_per_s=r["decode_tokens"] / r["decode_s"])
            cells.append(r)
            print(f"{task['label']:<16} {name:<7} B={b}: {r['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    return {"label": task["label"], "model": str(task["model"]), "cells": cells}


def run_model(task: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.batch_decode", "--child", json.dumps(task)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        return {"label": task["label"], "model": str(task["model"]), "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, Any]) -> str:
    """RESULTS-batch-decode.md from results.json: per model, tok/s by batch size and the ratio to B=1."""
    s = results["settings"]
    lines = ["# Batched decode without a server", "",
             f"Generated by `{results['command']}`, {results['started']} to {results['finished']}.", "",
             f"{s['prompt_tokens']}-token prompts, {s['tokens']} tokens per row, greedy, no EOS. Aggregate decode tok/s: every "
             "token after the last row's first, over the time from then to the end (prefill excluded). `x B=1`: against the "
             "same contender with one row. Ours is `generation.batch` (the server's batch); mlx-lm is its `BatchGenerator`.", ""]
    for m in results["models"]:
        lines += [f"## {m['label']}", ""]
        if "error" in m:
            lines += ["The run failed:", "", "```", m["error"].strip()[-1500:], "```", ""]
            continue
        lines += ["| rows | ours tok/s | ours x B=1 | mlx-lm tok/s | mlx-lm x B=1 | ours / mlx-lm |", "|---|---|---|---|---|---|"]
        by = {(c["contender"], c["batch"]): c for c in m["cells"]}
        for b in s["batches"]:
            o, r = by[("ours", b)], by[("mlx-lm", b)]
            o1, r1 = by[("ours", s["batches"][0])], by[("mlx-lm", s["batches"][0])]
            lines.append(f"| {b} | {o['tokens_per_s']:.1f} | {o['tokens_per_s'] / o1['tokens_per_s']:.2f}x | {r['tokens_per_s']:.1f} "
                         f"| {r['tokens_per_s'] / r1['tokens_per_s']:.2f}x | {o['tokens_per_s'] / r['tokens_per_s']:.2f}x |")
        lines.append("")
    mach = results["machine"]
    lines += ["## Machine", "", f"{json.dumps(mach, sort_keys=True)}", "", f"Versions: {json.dumps(results['versions'], sort_keys=True)}", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_decode", description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, default=48, help="tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="a tiny synthetic model, few tokens: checks the harness only")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".cache")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / ".cache" / "runs")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one model's cells may take")
    p.add_argument("--commit", action="store_true", help="copy the report and results.json into benchmarks/")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        args.batches, args.tokens, args.prompt_tokens = [1, 2], 6, 8
        models = [("quick-llama", ensure_synth(QUICK_MODELS[0], args.work))]
    else:
        models = [("default model", DEFAULT_MODEL), ("llama-125m f32", ensure_synth(LLAMA, args.work))]
    started = datetime.now().isoformat(timespec="seconds")
    results: dict[str, Any] = {
        "command": "python -m benchmarks.batch_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started,
        "settings": {"batches": args.batches, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens},
        "models": [run_model({"label": label, "model": str(path), "batches": args.batches, "tokens": args.tokens,
                              "prompt_tokens": args.prompt_tokens}, args.timeout) for label, path in models],
        "machine": machine_summary(), "versions": versions(),
    }
    results["finished"] = datetime.now().isoformat(timespec="seconds")
    folder = args.out / datetime.now().strftime("batch-decode-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "RESULTS-batch-decode.md").write_text(report(results))
    print(folder)
    if args.commit:
        shutil.copy(folder / "RESULTS-batch-decode.md", REPO / "benchmarks" / "RESULTS-batch-decode.md")
        shutil.copy(folder / "results.json", REPO / "benchmarks" / "results-batch-decode.json")
    return 0 if all("error" not in m for m in results["models"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
