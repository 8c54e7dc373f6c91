"""The training report (``training_report.json``): what was trained, how, on what, and how
well, so a packaged checkpoint can be judged and reproduced without rerunning it.

Only assembly lives here; the numbers come from ``train``. The field names and their order
are the report's format: the packaged ``mlx_engine/default_model/training_report.json`` and
anything that reads it rely on them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import YARN_ROPE_PARAMETERS

if TYPE_CHECKING:
    from .data import PreparedData
    from .train import AdaptiveThreads, LoopState


def model_section(args: argparse.Namespace, model: Any, n_params: int, n_active: int, vocab: int) -> dict[str, Any]:
    """The architecture, enough to rebuild the model."""
    return {
        "architecture": "GptOssForCausalLM",
        "parameters": n_params,
        "active_parameters_per_token": n_active,
        "hidden_size": args.hidden,
        "layers": args.layers,
        "layer_types": model.config.layer_types,
        "attention_heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "experts": args.experts,
        "experts_per_token": args.top_k,
        "expert_intermediate_size": args.expert_hidden,
        "sliding_window": args.sliding_window,
        "rope_parameters": YARN_ROPE_PARAMETERS,
        "vocab_size": vocab,
        "trained_context_length": args.seq_len,
    }


def training_section(
    args: argparse.Namespace,
    state: LoopState,
    threads: AdaptiveThreads | None,
    data: PreparedData,
    train_seconds: float,
    prep_seconds: float,
    wall_start: float,
) -> dict[str, Any]:
    """The recipe (optimiser, schedule, batch shape) and what it cost (steps, tokens, time)."""
    import torch

    return {
        "framework": f"transformers + torch {torch.__version__} on CPU, float32",
        "threads": args.threads,
        "adaptive_threads": args.adaptive_threads,
        "thread_switches": threads.switches if threads is not None else 0,
        "seed": args.seed,
        "optimizer": "AdamW (betas 0.9, 0.95)",
        "peak_lr": args.lr,
        "min_lr_ratio": args.min_lr_ratio,
        "warmup_steps": args.warmup_steps,
        "schedule": "linear warmup then cosine over " + ("steps" if args.max_steps else "the time budget"),
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "router_aux_loss_coef": args.router_aux_coef,
        "batch_size": args.batch_size,
        "sequence_length": args.seq_len,
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "epochs_over_train_tokens": round(state.tokens_seen / max(1, data.train_stream.size), 3),
        "time_budget_seconds": state.budget_s,
        "train_seconds": round(train_seconds, 1),
        "data_prep_seconds": round(prep_seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "tokens_per_second": round(state.tokens_seen / train_seconds, 1),
        "final_train_loss_ema": round(state.ema_loss, 4) if state.ema_loss is not None else None,
        "history": state.history,
    }


def evaluation_section(
    held_out: float, final: dict[str, Any], uniform: float, unigram: float, bytes_per_token: float
) -> dict[str, Any]:
    """Held-out loss beside the uniform and unigram baselines that say how much of it the
    model learned, and in bits per byte, which does not depend on the tokenizer."""
    return {
        "held_out_cross_entropy_nats_per_token": round(held_out, 4),
        "held_out_perplexity": round(math.exp(held_out), 2),
        "held_out_bits_per_byte": round(held_out / math.log(2) / bytes_per_token, 4),
        "held_out_tokens_scored": final["tokens"],
        "uniform_baseline_nats_per_token": round(uniform, 4),
        "unigram_baseline_nats_per_token": round(unigram, 4),
        "held_out_bytes_per_token": round(bytes_per_token, 3),
        "expert_load_per_layer": final.get("expert_load"),
    }


def command_line() -> str:
    """The command that made this run, as it would be typed again. Under ``python -m``,
    ``sys.argv[0]`` is the path of ``__main__.py``, which names nothing a reader can run."""
    name = Path(sys.argv[0]).name
    if name == "__main__.py":
        name = "python -m training.default_model"
    return " ".join([name, *sys.argv[1:]])


def environment_section() -> dict[str, Any]:
    """Where the run happened: the corpus is this interpreter's stdlib, so its version matters."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": command_line(),
    }


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Indented, non-ASCII kept as is (the samples are text to read), newline-terminated."""
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
