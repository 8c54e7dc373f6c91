"""Long prompts: prefill seconds and peak memory at 512 to 8192 tokens, ours against transformers.

    python -m benchmarks.long_prompts [--lengths 512 1024 2048 4096 8192] [--out DIR]

One fresh process per (contender, mode, length), so each peak resident set (VmHWM) is that
measurement's own. Every contender reads the same weights (llama-125m shape, float32, a
synthetic checkpoint; transformers gets the exported folder) and the same random prompt.

Contenders and modes:
  ours generate      create_generator, max_tokens=1: the chunked prefill a chat request runs
  ours none          run_with_cache with no hooks (chunked like generation)
  ours residuals     run_with_cache with every layer's residual
  ours residuals_last  the same with logits="last" (the last position's logits only)
  ours pattern_last  run_with_cache with one layer's attention pattern at the last position only
  transformers none / residuals (output_hidden_states) / residuals_last (and logits_to_keep=1) /
                     pattern_last (output_attentions,
                     eager attention: transformers returns every layer's full pattern)
Each process warms up on a 16-token prompt first and reports the median of `--repeats`
timed runs. results.json and RESULTS-long-prompts.md (written from it by
long_prompts_report.py) go to a new timestamped folder; the committed copies in benchmarks/
are those of the last full run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .checkpoints import ModelSpec, ensure_synth, export_for_transformers
from .long_prompts_report import table, write_long_prompt_report  # noqa: F401  (table: the rows as Markdown)
from .machine import machine_summary, versions
from .worker import memory_status

SPEC = ModelSpec("llama-125m-f32", "llama-125m", "float32")
LENGTHS = (512, 1024, 2048, 4096, 8192)
PATTERN_LAYER = 5
MODES = {
    "ours": ("generate", "none", "residuals", "residuals_last", "pattern_last"),
    "transformers": ("none", "residuals", "residuals_last", "pattern_last"),
}


def _prompt(vocab: int, n: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(3, vocab, size=n)]


def _ours(folder: Path, mode: str, n: int) -> Callable[[list[int]], None]:
    import mlx.core as mx

    import mlx_engine

    kit = mlx_engine.load_model(folder)
    residuals = [{"layer_name": i, "component": "residual"} for i in range(kit.arch_info.num_layers)]
    hooks: list[Any] = {
        "none": [],
        "residuals": residuals,
        "residuals_last": residuals,
        "pattern_last": [{"layer_name": PATTERN_LAYER, "component": "attention_pattern", "positions": "last"}],
    }.get(mode, [])

    def run(prompt: list[int]) -> None:
        if mode == "generate":
            for _ in mlx_engine.create_generator(kit, prompt, max_tokens=1):
                pass
            return
        cache = mlx_engine.run_with_cache(kit, prompt, hooks, logits="last" if mode == "residuals_last" else "all")
        mx.eval(cache.logits, *[c.array for c in cache.activations.values()])

    return run


def _transformers(folder: Path, mode: str, n: int) -> Callable[[list[int]], None]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    attn = "eager" if mode == "pattern_last" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation=attn).eval()

    def run(prompt: list[int]) -> None:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model(ids, output_hidden_states=mode.startswith("residuals"), output_attentions=mode == "pattern_last",
                        logits_to_keep=1 if mode == "residuals_last" else 0)
        if mode == "pattern_last":
            _ = out.attentions[PATTERN_LAYER][0, :, -1].clone()

    return run


def measure_one(contender: str, folder: Path, mode: str, n: int, repeats: int, vocab: int) -> dict[str, Any]:
    """Load, warm up, time `repeats` prefills of n tokens; the process's peak memory with it."""
    build = _ours if contender == "ours" else _transformers
    run = build(folder, mode, n)
    run(_prompt(vocab, 16))
    loaded = memory_status()["rss"]
    prompt = _prompt(vocab, n)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(prompt)
        seconds.append(time.perf_counter() - start)
    mem = memory_status()
    return {"contender": contender, "mode": mode, "tokens": n, "seconds": statistics.median(seconds), "all_seconds": seconds,
            "peak_rss": mem["peak_rss"], "rss_after_load": loaded}


def _child(args: argparse.Namespace) -> int:
    result = measure_one(args.contender, Path(args.folder), args.mode, args.tokens, args.repeats, args.vocab)
    print("@@ " + json.dumps(result), flush=True)
    return 0


def measure_in_child(contender: str, folder: Path, mode: str, n: int, repeats: int, vocab: int, timeout: float,
                     env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """measure_one in a fresh process (its own peak memory), under `env` if given."""
    cmd = [sys.executable, "-m", "benchmarks.long_prompts", "--child", contender, str(folder), mode, str(n),
           "--repeats", str(repeats), "--vocab", str(vocab)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"contender": contender, "mode": mode, "tokens": n, "error": f"over {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@ "):
            return json.loads(line[3:])
    status = "killed by SIGKILL (on Linux usually the OOM killer: see dmesg)" if proc.returncode == -9 else f"exit status {proc.returncode}"
    return {"contender": contender, "mode": mode, "tokens": n, "error": f"{status}; {(proc.stderr or proc.stdout)[-400:]}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_prompts", description=__doc__.split("\n")[0])
    p.add_argument("--child", nargs=4, metavar=("CONTENDER", "FOLDER", "MODE", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32000, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=Path("benchmarks/.cache"), help="where the checkpoints are written")
    p.add_argument("--out", type=Path, default=Path("benchmarks/.cache/runs"), help="a new timestamped folder is made here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one measurement may take")
    p.add_argument("--ops", type=int, nargs="*", default=[512, 2048, 8192],
                   help="lengths for benchmarks.prefill_ops in the same run (none: skip it)")
    args = p.parse_args(argv)
    if args.child:
        args.contender, args.folder, args.mode, tokens = args.child
        args.tokens = int(tokens)
        return _child(args)
    mlx_dir = ensure_synth(SPEC, args.work)
    tf_dir = export_for_transformers(mlx_dir, args.work / f"{SPEC.key}-transformers")
    vocab = json.loads((mlx_dir / "config.json").read_text())["vocab_size"]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    folder = args.out / time.strftime("long-prompts-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    rows = []
    load_samples = []  # the 1-minute load average as each measurement starts
    load_start = os.getloadavg()
    for n in args.lengths:
        for contender, modes in MODES.items():
            for mode in modes:
                where = mlx_dir if contender == "ours" else tf_dir
                load_samples.append(os.getloadavg()[0])
                row = measure_in_child(contender, where, mode, n, args.repeats, vocab, args.timeout)
                rows.append(row)
                shown = row.get("error") or f"{row['seconds']:.2f} s, peak {row['peak_rss'] / 2**30:.2f} GiB"
                print(f"{n:>5} tokens  {contender:<12} {mode:<12} {shown}", flush=True)
                (folder / "partial.json").write_text(json.dumps({"model": SPEC.label, "rows": rows}, indent=1))
    results = {"model": SPEC.label, "command": "python -m benchmarks.long_prompts " + " ".join(argv or sys.argv[1:]),
               "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_start,
               "load_average_end": os.getloadavg(), "load_average_samples": load_samples,
               "machine": machine_summary(), "versions": versions(), "rows": rows}
    if args.ops:
        results["ops"] = _ops_child(args.ops, args.timeout)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    write_long_prompt_report(results, folder / "RESULTS-long-prompts.md")
    print(table(rows))
    print(folder)
    return 0


def _ops_child(lengths: list[int], timeout: float) -> Any:
    """benchmarks.prefill_ops in its own process (its imports and allocations stay out of ours)."""
    out = Path(tempfile.mkdtemp()) / "ops.json"
    cmd = [sys.executable, "-m", "benchmarks.prefill_ops", "--lengths", *map(str, lengths), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        return {"error": proc.stderr[-600:]}
    return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
