"""The two SAE trainers of benchmarks/sae_training.py, one per process, and the one metric both are judged by.

    python -m benchmarks.sae_trainers ours|saelens SPEC.json     (prints one `@@ {json}` line)

`ours` runs `mlx_engine.sae.train` on the activation store itself. `saelens` runs SAELens's
own trainer, `sae_lens.training.sae_trainer.SAETrainer.fit`, on a `TopKTrainingSAE`
(`TopKTrainingSAEConfig`, normalize_activations="expected_average_only_in"), fed by an
in-memory data provider (SAELens's `DataProvider`: an iterator of torch batches) over the
rows exported from the same store: first the rows our trainer samples for its normalisation
constant (SAELens's scaler estimates its own constant from them), then, step by step, the very
batches our trainer draws (their indices were written by the driver from our BatchStream).
Its LLM runner (`LanguageModelSAETrainingRunner`) is not used: it needs a TransformerLens model
and its own activation store; everything after the data source is SAELens's code.

This module imports only the standard library and numpy at the top, so the SAELens process
never loads MLX (and ours never loads torch): each peak resident set is its trainer's own.
`heldout_metrics` reads both saved SAEs (SAELens's file format) and computes FVE and L0 on the
same held-out rows in float64 numpy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .worker import memory_status

MARK = "@@ "


def _topk_weights(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg.get("architecture") != "topk":
        raise ValueError(f"{folder}: expected a TopK SAE, cfg.json says {cfg.get('architecture')!r}.")
    if cfg.get("normalize_activations", "none") not in ("none", "expected_average_only_in"):
        raise ValueError(f"{folder}: run-time normalisation {cfg['normalize_activations']!r} is not handled here.")
    weights = {k: np.asarray(v, np.float64) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    return cfg, weights


def heldout_metrics(folder: Path, x: np.ndarray, batch: int = 4096) -> dict[str, float]:
    """Fraction of variance explained and L0 of the TopK SAE saved in `folder` on rows x [N, d_in].

    The SAELens TopK forward, written out in numpy (float64): pre = (x - b_dec) @ W_enc + b_enc
    (b_dec subtracted when apply_b_dec_to_input), times |W_dec_i| when rescale_acts_by_decoder_norm;
    f = relu of each row's k largest pre-activations; x_hat = (f / |W_dec_i| if rescaled) @ W_dec + b_dec.
    fve = 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2; l0 = mean count of non-zero f per row.
    """
    cfg, w = _topk_weights(folder)
    k = int(cfg["k"])
    norms = np.linalg.norm(w["W_dec"], axis=1) if cfg.get("rescale_acts_by_decoder_norm") else None
    rows = np.asarray(x, np.float64)
    err = active = 0.0
    for lo in range(0, len(rows), batch):
        xb = rows[lo : lo + batch]
        pre = (xb - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else xb) @ w["W_enc"] + w["b_enc"]
        if norms is not None:
            pre = pre * norms
        top = np.argpartition(-pre, k - 1, axis=1)[:, :k]
        f = np.zeros_like(pre)
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0.0), axis=1)
        x_hat = (f / norms if norms is not None else f) @ w["W_dec"] + w["b_dec"]
        err += float(np.sum((xb - x_hat) ** 2))
        active += float(np.count_nonzero(f))
    var = float(np.sum((rows - rows.mean(axis=0)) ** 2))
    return {"fve": 1.0 - err / var, "l0": active / len(rows), "rows": int(len(rows))}


def _finish(trainer: str, started: float, tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    mem = memory_status()
    return {"trainer": trainer, "seconds": seconds, "train_tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_rss_bytes": mem["peak_rss"], **extra}


def train_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """mlx_engine.sae.train on the store; timed from the call to its return (setup, held-out metrics and save included)."""
    import mlx_engine  # noqa: F401  (first: it picks the BLAS before MLX loads)
    from mlx_engine.sae import train

    s = spec["settings"]
    started = time.perf_counter()
    result = train(spec["store"], s["hook"], s["d_sae"], spec["out"], architecture="topk", k=s["k"], lr=s["lr"],
                   tokens=s["steps"] * s["batch_size"], batch_size=s["batch_size"], seed=s["seed"],
                   eval_tokens=s["eval_tokens"], eval_ce=False, progress=False, lr_warm_up_steps=spec["warm_up_steps"],
                   lr_decay_steps=spec["decay_steps"], dead_tokens=spec["dead_steps"] * s["batch_size"])
    m = result.metrics
    return _finish("ours", started, int(m["train_tokens"]), {
        "own_heldout": {"fve": m["heldout_fve"], "l0": m["heldout_l0"], "rows": m["heldout_tokens"]},
        "dead_fraction_training": m["dead_fraction_training"],
    })


def _batches(spec: dict[str, Any]) -> Iterator[Any]:
    """SAELens's data provider: the normalisation rows in batches, then our trainer's batches in order."""
    import torch

    rows = np.load(spec["rows"], mmap_mode="r")
    order = np.load(spec["order"])
    norm_rows = np.load(spec["norm_rows"])
    size = spec["settings"]["batch_size"]
    for lo in range(0, len(norm_rows), size):
        yield torch.from_numpy(np.ascontiguousarray(norm_rows[lo : lo + size]))
    for idx in order:
        yield torch.from_numpy(np.asarray(rows[np.sort(idx)], np.float32))
    raise RuntimeError("SAELens asked for more batches than the run has steps.")


def train_saelens(spec: dict[str, Any]) -> dict[str, Any]:
    """SAETrainer.fit on a TopKTrainingSAE over our batches (module docstring); save_inference_model writes it."""
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    s = spec["settings"]
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    torch.manual_seed(s["seed"])
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=spec["d_in"], d_sae=s["d_sae"], k=s["k"],
                                                normalize_activations="expected_average_only_in"))
    cfg = SAETrainerConfig(
        total_training_samples=s["steps"] * s["batch_size"], train_batch_size_samples=s["batch_size"], lr=s["lr"],
        lr_end=s["lr"], lr_scheduler_name="constant", lr_warm_up_steps=spec["warm_up_steps"],
        lr_decay_steps=spec["decay_steps"], dead_feature_window=spec["dead_steps"],
        n_batches_for_norm_estimate=-(-spec["norm_rows_count"] // s["batch_size"]),
    )
    trainer = SAETrainer(cfg, sae, _batches(spec))
    trainer.fit()
    sae.save_inference_model(spec["out"])
    return _finish("saelens", started, trainer.n_training_samples, {
        "torch_threads": torch.get_num_threads(), "dead_fraction_training": float(trainer.dead_neurons.float().mean()),
    })


def _import(which: str) -> None:
    """The trainer's libraries, loaded before its spec is read (a quick run starts the process early)."""
    if which == "ours":
        import mlx_engine  # noqa: F401  (first: it picks the BLAS before MLX loads)
        import mlx_engine.sae.trainer  # noqa: F401
    else:
        import sae_lens.training.sae_trainer  # noqa: F401


def wait_for_spec(path: Path, timeout: float = 900.0) -> dict[str, Any]:
    """The spec the driver writes (atomically) once the data is ready; a `cancel` entry says why it never will be."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no spec at {path} after {timeout:.0f} s")
        time.sleep(0.1)
    spec = json.loads(path.read_text())
    if "cancel" in spec:
        raise RuntimeError(f"cancelled by the driver: {spec['cancel']}")
    return spec


def main(argv: list[str]) -> int:
    which, spec_path = argv
    if which not in ("ours", "saelens"):
        raise SystemExit(f"trainer must be ours or saelens, got {which!r}")
    _import(which)
    spec = wait_for_spec(Path(spec_path))
    result = (train_ours if which == "ours" else train_saelens)(spec)
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
