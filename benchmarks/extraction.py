"""Corpus extraction: tokens/s of `mlx_engine.extract` (every layer's residual) against the same work done otherwise.

    python -m benchmarks.extraction [--tokens 2048] [--rss-tokens 8192] [--context 256] [--batch 8] [--small-model] [--out DIR]

One fresh process per measurement (its peak RSS, VmHWM, is its own); every contender runs
the same windows of the same corpus (research_runs.py: standard-library source, tokenized
by the checkpoint's tokenizer, cut and batched by store/plan.py as extraction cuts them) on
the same weights (llama-125m shape, float32, synthetic; torch contenders read the exported
transformers folder). Each process loads, warms up on the first batch, then is timed.

  extract            mlx_engine.extract into a new store: tokenizing, the forward, statistics, shards on disk
  hooks_off          the same batches, right-padded the same way, through the model with no hook armed
                     (the last position's logits evaluated: a prefill)
  run_with_cache     mlx_engine.run_with_cache per window (batch 1), every residual copied to numpy
  transformers       torch float32, output_hidden_states=True, batch 1 and batch 8, real rows to numpy
  transformer_lens   HookedTransformer.run_with_cache (names_filter hook_resid_post), batch 1 and 8;
                     built offline from the same transformers model (a config written from ours,
                     TransformerLens's own convert_llama_weights), checked against transformers
  peak RSS           extract of --rss-tokens and of a tenth of it: memory should not grow with the corpus
  2 ranks            extract as a data-parallel job of 2 processes (MLX_RANK, MLX_HOSTFILE on 127.0.0.1)

results.json and RESULTS-extraction.md go to a new timestamped folder (research_report.py
writes the report; `python -m benchmarks.research_report` joins this run and a store-analysis
run into the committed benchmarks/RESULTS-research.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .checkpoints import QUICK_MODELS, ModelSpec, ensure_synth, export_for_transformers
from .machine import machine_summary
from .research_runs import answer, child_main, folder_bytes, research_versions, run_task, start, timed_task, write_corpus

SPEC = ModelSpec("llama-125m-f32", "llama-125m", "float32")
QUICK_SPEC = QUICK_MODELS[0]
TORCH_BATCHES = (1, 8)


def _windows(task: dict[str, Any]) -> list[list[np.ndarray]]:
    """The batches of windows extraction runs (store/plan.py on the corpus, the checkpoint's tokenizer)."""
    with np.load(task["windows"]) as z:
        flat = [z[f"w{i}"] for i in range(int(z["count"]))]
        sizes = z["batch_sizes"].tolist()
    out, at = [], 0
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out


def plan_windows(mlx_dir: Path, corpus: Path, context: int, batch: int, max_tokens: int, path: Path) -> int:
    """Write the windows of the first `max_tokens` tokens, batched as extraction batches them; their token count."""
    import mlx_engine
    from mlx_engine.loading import tokenize
    from mlx_engine.store.corpus import Corpus
    from mlx_engine.store.plan import plan_batches

    kit = mlx_engine.load_model(mlx_dir)
    batches = [b for b in plan_batches(Corpus(corpus), lambda t: tokenize(kit, t), context_size=context, batch_size=batch,
                                       max_tokens=max_tokens) if b.windows]
    flat = [w.tokens for b in batches for w in b.windows]
    np.savez(path, count=len(flat), batch_sizes=np.array([len(b.windows) for b in batches]), **{f"w{i}": w for i, w in enumerate(flat)})
    return int(sum(len(w) for w in flat))


def _padded(windows: list[np.ndarray], pad: int = 0) -> np.ndarray:
    out = np.full((len(windows), max(len(w) for w in windows)), pad, dtype=np.int64)
    for i, w in enumerate(windows):
        out[i, : len(w)] = w
    return out


def _timed_batches(batches: list[list[np.ndarray]], run: Any) -> dict[str, Any]:
    run(batches[0])  # warm-up, not timed
    start = time.perf_counter()
    for b in batches:
        run(b)
    seconds = time.perf_counter() - start
    tokens = sum(len(w) for b in batches for w in b)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _extract(task: dict[str, Any]) -> dict[str, Any]:
    import mlx_engine

    kit = mlx_engine.load_model(task["model"])
    hooks = [f"layers.{i}.residual" for i in range(kit.arch_info.num_layers)]
    opts = dict(context_size=task["context"], batch_size=task["batch"], shard_tokens=task["shard_tokens"], progress=False)
    if task.get("warmup_tokens"):
        mlx_engine.extract(kit, task["corpus"], hooks, task["scratch"], max_tokens=task["warmup_tokens"], **opts)
    start = time.perf_counter()
    store = mlx_engine.extract(kit, task["corpus"], hooks, task["out"], max_tokens=task["max_tokens"], **opts)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"seconds": seconds, "rank": int(os.environ.get("MLX_RANK", 0))}
    if store is not None:
        t = store.manifest["timings"]
        out.update(tokens=store.num_tokens, tokens_per_s=store.num_tokens / seconds, store_bytes=folder_bytes(store.path),
                   shards=len(store.manifest["shards"]), world_size=store.manifest.get("world_size", 1),
                   compute_seconds=t["compute_seconds"], stats_seconds=t["stats_seconds"], write_seconds=t["write_seconds"])
    return out


def _hooks_off(task: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    import mlx_engine

    kit = mlx_engine.load_model(task["model"])

    def run(batch: list[np.ndarray]) -> None:
        mx.eval(kit.model(mx.array(_padded(batch).astype(np.uint32)), cache=make_prompt_cache(kit.model), last_only=True))

    return _timed_batches(_windows(task), run)


def _run_with_cache(task: dict[str, Any]) -> dict[str, Any]:
    import mlx_engine

    kit = mlx_engine.load_model(task["model"])
    hooks = [{"layer_name": i, "component": "residual"} for i in range(kit.arch_info.num_layers)]

    def run(batch: list[np.ndarray]) -> None:
        for window in batch:
            cache = mlx_engine.run_with_cache(kit, window.tolist(), hooks)
            _ = [np.array(c.array) for c in cache.activations.values()]

    return _timed_batches(_windows(task), run)


def _hf_model(folder: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _real_rows(tensors: list[Any], batch: list[np.ndarray]) -> list[np.ndarray]:
    """Each tensor's rows of real (unpadded) tokens, as numpy (what a store keeps)."""
    mask = _padded(batch, -1) >= 0
    return [t[mask].numpy() for t in tensors]


def _transformers(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    model = _hf_model(task["tf"])

    def run(batch: list[np.ndarray]) -> None:
        for part in _split(batch, task["batch"]):
            with torch.inference_mode():
                out = model(torch.tensor(_padded(part)), output_hidden_states=True)
            _real_rows(list(out.hidden_states[1:]), part)

    return {**_timed_batches(_windows(task), run), "torch_threads": torch.get_num_threads()}


def _split(batch: list[np.ndarray], size: int) -> list[list[np.ndarray]]:
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def hooked_transformer(hf: Any, config: dict[str, Any]) -> Any:
    """A TransformerLens HookedTransformer with the transformers model's weights, built offline (no Hub lookup)."""
    import warnings

    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_llama_weights

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    cfg = HookedTransformerConfig(
        d_model=config["hidden_size"], d_head=head_dim, n_heads=config["num_attention_heads"], d_mlp=config["intermediate_size"],
        n_layers=config["num_hidden_layers"], n_ctx=config["max_position_embeddings"], eps=config["rms_norm_eps"],
        d_vocab=config["vocab_size"], act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=head_dim, final_rms=True, gated_mlp=True, rotary_base=config["rope_theta"],
        n_key_value_heads=config["num_key_value_heads"], original_architecture="LlamaForCausalLM", dtype=torch.float32, device="cpu",
    )
    with warnings.catch_warnings():  # TransformerLens 3 deprecates HookedTransformer for TransformerBridge, which needs the Hub
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()


def _transformer_lens(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    hf = _hf_model(task["tf"])
    config = json.loads((Path(task["tf"]) / "config.json").read_text())
    model = hooked_transformer(hf, config)
    layers = config["num_hidden_layers"]
    names = [f"blocks.{i}.hook_resid_post" for i in range(layers)]
    first = _windows(task)[0][:1]
    with torch.inference_mode():  # the same weights: TL's residuals against transformers' hidden states
        ids = torch.tensor(_padded(first))
        hidden = hf(ids, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(ids, names_filter=names)
    # transformers' last hidden state has the final norm applied; the layers before it are plain residuals.
    diff = max(float((cache[names[i]] - hidden[i + 1]).abs().max()) for i in range(layers - 1))
    scale = max(float(hidden[i + 1].abs().max()) for i in range(layers - 1))
    del hf

    def run(batch: list[np.ndarray]) -> None:
        for part in _split(batch, task["batch"]):
            with torch.inference_mode():
                _, c = model.run_with_cache(torch.tensor(_padded(part)), names_filter=names)
            _real_rows([c[n] for n in names], part)

    return {**_timed_batches(_windows(task), run), "max_abs_diff_vs_transformers": diff, "max_abs_residual": scale}


MEASURES = {"extract": _extract, "hooks_off": _hooks_off, "run_with_cache": _run_with_cache,
            "transformers": _transformers, "transformer_lens": _transformer_lens}


def measure(task: dict[str, Any]) -> dict[str, Any]:
    label = {k: task[k] for k in ("kind", "label") if k in task}
    return {**label, **({"batch": task["batch"]} if task["kind"] in ("transformers", "transformer_lens") else {}),
            **timed_task(lambda: MEASURES[task["kind"]](task))}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def two_ranks(task: dict[str, Any], folder: Path, timeout: float) -> dict[str, Any]:
    """The extract task as a 2-process data-parallel job on 127.0.0.1 (ring backend); each rank's answer."""
    hostfile = folder / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(2)]))
    procs = [start("extraction", task, {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}) for r in range(2)]
    ranks = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            ranks.append(answer(task, p.returncode, out, err))
        except Exception as exc:  # a timeout: stop both, record it
            for q in procs:
                q.kill()
            ranks.append({"error": f"{type(exc).__name__}: {exc}"})
    ok = [r for r in ranks if "error" not in r]
    row: dict[str, Any] = {"label": "extract, 2 ranks", "ranks": ranks}
    if len(ok) != 2 or "tokens" not in ranks[0]:
        row["error"] = next((r["error"] for r in ranks if "error" in r), "rank 0 returned no store")
        return row
    seconds = max(r["seconds"] for r in ranks)
    row.update(tokens=ranks[0]["tokens"], seconds=seconds, tokens_per_s=ranks[0]["tokens"] / seconds,
               peak_rss_bytes=max(r["peak_rss_bytes"] for r in ranks), world_size=ranks[0]["world_size"])
    return row


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.extraction", description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a tiny model and corpus, measured in this process: checks the harness only")
    p.add_argument("--tokens", type=int, default=4096, help="corpus tokens every contender runs")
    p.add_argument("--rss-tokens", type=int, default=8192, help="tokens of the large peak-RSS run (the small one: a tenth)")
    p.add_argument("--context", type=int, default=256, help="tokens per window")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--no-ranks", action="store_true", help="skip the 2-rank run")
    p.add_argument("--small-model", action="store_true", help="the quick mode's tiny model (2 layers, hidden 256) with the "
                   "full run's measurements, each in its own process: a 1M-token peak-RSS run in minutes")
    p.add_argument("--work", type=Path, default=Path("benchmarks/.cache"), help="where the checkpoints are written")
    p.add_argument("--out", type=Path, default=Path("benchmarks/.cache/runs"), help="a new timestamped folder is made here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one measurement may take")
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child, measure)
    if args.quick:
        args.tokens, args.rss_tokens, args.context, args.batch = 256, 640, 64, 4
    results = run(args, argv)
    from .research_report import extraction_table

    print(extraction_table(results))
    print(results["folder"])
    return 0


def run(args: argparse.Namespace, argv: Optional[list[str]]) -> dict[str, Any]:
    """Every measurement of one run; results.json and RESULTS-extraction.md in a new folder."""
    from .research_report import write_extraction_report

    spec = QUICK_SPEC if args.quick or args.small_model else SPEC
    mlx_dir = ensure_synth(spec, args.work)
    tf_dir = export_for_transformers(mlx_dir, args.work / f"{spec.key}-transformers")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()  # before any measurement: other work's load alone
    folder = args.out / time.strftime("extraction-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    corpus = write_corpus(folder / "corpus.jsonl", max(args.tokens, args.rss_tokens))
    windows = folder / "windows.npz"
    planned = plan_windows(mlx_dir, folder / "corpus.jsonl", args.context, args.batch, args.tokens, windows)
    base = {"model": str(mlx_dir), "tf": str(tf_dir), "corpus": str(folder / "corpus.jsonl"), "windows": str(windows),
            "context": args.context, "batch": args.batch, "max_tokens": args.tokens, "shard_tokens": args.context * args.batch}
    warm = args.context * args.batch

    def extract_task(name: str, tokens: int, warmup: bool = True) -> dict[str, Any]:
        return {**base, "kind": "extract", "label": name, "max_tokens": tokens, "out": str(folder / name),
                "scratch": str(folder / f"{name}-warmup"), "warmup_tokens": warm if warmup else 0}

    tasks = [extract_task("extract", args.tokens), {**base, "kind": "hooks_off", "label": "hooks off"},
             {**base, "kind": "run_with_cache", "label": "run_with_cache per window"}]
    tasks += [{**base, "kind": k, "batch": b, "label": f"{k} batch {b}"} for k in ("transformers", "transformer_lens") for b in TORCH_BATCHES]
    rows = []
    for task in tasks:
        row = run_task("extraction", task, measure, args.quick, args.timeout)
        rows.append(row)
        print(f"{row.get('label', task['label']):<28} " + (row.get("error") or f"{row['tokens_per_s']:.1f} tok/s, peak {row['peak_rss_bytes'] / 2**30:.2f} GiB"), flush=True)
        (folder / "partial.json").write_text(json.dumps(rows, indent=1))
    rss = [run_task("extraction", extract_task(f"rss-{n}", n, warmup=False), measure, args.quick, args.timeout)
           for n in (args.rss_tokens, max(1, args.rss_tokens // 10))]
    ranks = None if args.no_ranks else two_ranks(extract_task("extract-2-ranks", args.tokens), folder, args.timeout)
    for store in [d for d in folder.iterdir() if d.is_dir()]:  # every size is recorded; the stores are not kept
        shutil.rmtree(store)
    results = {
        "benchmark": "extraction", "quick": args.quick, "model": spec.label, "model_key": spec.key,
        "command": "python -m benchmarks.extraction " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "settings": {"tokens": args.tokens, "planned_tokens": planned, "rss_tokens": [args.rss_tokens, max(1, args.rss_tokens // 10)],
                     "context_size": args.context, "batch_size": args.batch, "shard_tokens": args.context * args.batch, "hooks": "every layer's residual", "dtype": "float32"},
        "corpus": corpus, "machine": machine_summary(), "versions": research_versions(), "rows": rows, "rss": rss, "ranks": ranks,
        "in_process": args.quick,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    write_extraction_report(results, folder / "RESULTS-extraction.md")
    results["folder"] = str(folder)
    return results


if __name__ == "__main__":
    sys.exit(main())
