"""`train`: an SAE (or transcoder) trained in MLX on an activation store, resumable after a kill.

One step: a shuffled batch (sae/data.py), scaled by the normalisation constant; the
architecture's loss (sae/objectives.py) with the learning rate and sparsity coefficient of
the schedules (sae/config.py); gradients clipped to global norm 1; for unit-norm decoders the
gradient along each decoder row removed and the rows renormalised after Adam's update;
JumpReLU thresholds kept >= 0 (SAELens); BatchTopK's inference threshold an EMA of the
smallest kept activation (SAELens); relu latents dead for `resample` steps resampled during
the first half of training (Bricken et al. 2023: decoder row = a high-loss input drawn with
probability proportional to its squared loss, normalised; encoder column = that direction at
0.2 x the mean alive encoder norm; b_enc 0; their Adam moments reset).

Every `checkpoint_every` steps the whole state goes to out/checkpoint.safetensors
(sae/checkpoint.py); re-running the same call resumes there and ends with the same weights as
an uninterrupted run. At the end the normalisation constants and decoder norms are folded into
the weights (BatchTopK becomes JumpReLU), the SAE is saved in SAELens's format in `out`, its
held-out metrics and CE loss recovered (sae/metrics.py) go to out/training.json, and the
checkpoint is removed; a finished `out` is returned as it is.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from ..hooks.components import ComponentType
from ..hooks.names import ResolvedHook
from .checkpoint import TrainState, load_checkpoint, remove_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import BatchStream, Data, Source, heldout_windows, open_source, sample_rows
from .formats import load_sae, save_sae, transformerlens_name
from .initial import initial_b_dec, initial_params, norm_scale
from .metrics import ce_loss_recovered, reconstruction_metrics
from .model import SAE, SAEConfig, SAEError
from .objectives import Objective, project_decoder_gradient, renormalize_decoder

TRAINING_FILE = "training.json"


@dataclass
class TrainResult:
    """The trained SAE (folded, as saved), its metrics, the folder it is in, and the logged history."""

    sae: SAE
    metrics: dict[str, Any]
    path: Path
    history: list[dict[str, Any]]


def _config(d_sae: Optional[int], options: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SAEError(f"unknown training option(s) {unknown}; valid: {', '.join(sorted(known - {'d_sae'}))}.")
    if d_sae is None:
        raise SAEError("give d_sae, the number of SAE features.")
    return TrainConfig(d_sae=d_sae, **options)


def _start(cfg: TrainConfig, source: Source, transcoder: bool) -> TrainState:
    rng = np.random.default_rng(cfg.seed)
    sample = sample_rows(source, cfg.init_rows, cfg.seed)
    scales = [norm_scale(rows) if cfg.normalize else 1.0 for rows in sample]
    b_dec = initial_b_dec(cfg, sample[-1], scales[-1])
    params = {k: mx.array(v) for k, v in initial_params(cfg, source.widths[0], source.widths[-1], b_dec, rng).items()}
    return TrainState(params, {}, np.zeros(cfg.d_sae, np.int64), 0, rng, scales)


def _resample(cfg: TrainConfig, state: TrainState, objective: Objective, x: mx.array, y: mx.array, dead: np.ndarray) -> None:
    """Bricken et al. 2023's resampling of the dead latents (module docstring), in place on `state`."""
    _, _, y_hat = objective.forward(state.params, x)
    loss = np.array(mx.sum((y_hat - y) ** 2, axis=-1), dtype=np.float64) ** 2
    prob = loss / loss.sum() if loss.sum() > 0 else None
    picks = state.rng.choice(len(loss), size=len(dead), replace=len(dead) > len(loss), p=prob)
    p = {k: np.array(v) for k, v in state.params.items()}
    enc_dirs, dec_dirs = (np.array(a)[picks] for a in (x, y))
    enc_dirs /= np.maximum(np.linalg.norm(enc_dirs, axis=1, keepdims=True), 1e-12)
    dec_dirs /= np.maximum(np.linalg.norm(dec_dirs, axis=1, keepdims=True), 1e-12)
    alive = np.ones(cfg.d_sae, bool)
    alive[dead] = False
    enc_norm = float(np.linalg.norm(p["W_enc"][:, alive], axis=0).mean()) if alive.any() else 1.0
    p["W_enc"][:, dead] = enc_dirs.T * 0.2 * enc_norm
    p["W_dec"][dead] = dec_dirs
    p["b_enc"][dead] = 0.0
    state.params = {k: mx.array(v) for k, v in p.items()}
    keep = {"W_enc": (slice(None), dead), "W_dec": (dead,), "b_enc": (dead,)}
    for name, where in keep.items():
        moments = state.opt_state.get(name, {})
        for m in ("m", "v"):
            if m in moments:
                arr = np.array(moments[m])
                arr[where] = 0.0
                moments[m] = mx.array(arr)
    state.since_fired[dead] = 0


def _step(cfg: TrainConfig, steps: int, state: TrainState, objective: Objective, opt: optim.Adam, x: mx.array, y: mx.array,
          schedule: dict[str, int]) -> dict[str, float]:
    """One optimiser step on (x, y), already normalised; returns the batch's metrics."""
    step = state.step
    dead_np = state.since_fired >= schedule["dead"]
    n_dead = int(dead_np.sum())
    dead = mx.array(dead_np)
    coefficient = mx.array(cfg.sparsity_at(step, steps), dtype=mx.float32)

    def loss(p: dict[str, mx.array]) -> tuple[mx.array, ...]:
        return objective.loss(p, x, y, coefficient, dead, n_dead)

    (total, mse, sparsity, aux, f, y_hat), grads = mx.value_and_grad(loss)(state.params)
    grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
    if cfg.unit_decoder:
        grads = project_decoder_gradient(grads, state.params)
    lr = cfg.lr_at(step, steps)
    opt.learning_rate = lr
    params = opt.apply_gradients(grads, state.params)
    if cfg.unit_decoder:
        params = renormalize_decoder(params)
    if "threshold" in params:
        params = {**params, "threshold": mx.maximum(params["threshold"], 0)}
    fired = mx.any(f > 0, axis=0)
    centred = y - mx.mean(y, axis=0)
    fve = 1 - mx.sum((y - y_hat) ** 2) / mx.maximum(mx.sum(centred * centred), 1e-12)
    l0 = mx.mean(mx.sum((f > 0).astype(mx.float32), axis=-1))
    smallest = mx.min(mx.where(f > 0, f, mx.array(mx.inf, dtype=f.dtype)))
    mx.eval(params, opt.state, total, mse, sparsity, aux, fired, fve, l0, smallest)
    state.params, state.opt_state = params, opt.state
    state.since_fired += 1
    state.since_fired[np.array(fired)] = 0
    if cfg.architecture == "batchtopk" and np.isfinite(smallest.item()):
        rate = cfg.batchtopk_threshold_lr
        state.threshold = (1 - rate) * state.threshold + rate * float(smallest.item())
    if cfg.architecture == "relu" and (step + 1) % schedule["resample"] == 0 and step + 1 <= steps // 2:
        dead_now = np.nonzero(state.since_fired >= schedule["resample"])[0]
        if len(dead_now):
            _resample(cfg, state, objective, x, y, dead_now)
    state.step += 1
    return {"step": state.step, "loss": total.item(), "mse": mse.item(), "sparsity_loss": sparsity.item(), "aux_loss": aux.item(),
            "fve": fve.item(), "l0": l0.item(), "dead_fraction": float(np.mean(state.since_fired >= schedule["dead"])), "lr": lr}


def _store_hook(source: Source, index: int) -> tuple[str, Optional[int], Optional[str]]:
    """(TransformerLens hook name, layer, our hook id) of the source's `index`-th view."""
    name = source.names[index]
    if source.store is None:
        return name, None, None
    entry = source.store.hook_info(name)
    hook = ResolvedHook(name, entry["site"], entry["layer"], entry["layer_name"], ComponentType(entry["component"]),
                        entry["is_input"], indices=tuple(entry["indices"]) if entry.get("indices") else None)
    return transformerlens_name(hook), entry["layer"], name


def _final_sae(cfg: TrainConfig, state: TrainState, source: Source, transcoder: bool) -> SAE:
    """The trained weights in raw units with unit-norm decoder rows (see the module docstring)."""
    p = {k: np.array(v, dtype=np.float64) for k, v in state.params.items()}
    c_in, c_out = state.scales[0], state.scales[-1]
    p["W_enc"] *= c_in
    p["W_dec"] /= c_out
    p["b_dec"] /= c_out
    arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[cfg.architecture]
    if cfg.architecture == "batchtopk":
        p["threshold"] = np.full(cfg.d_sae, state.threshold)
    if not (cfg.architecture == "topk" and not cfg.unit_decoder):  # folding rescales every latent: TopK's choice needs equal norms
        norms = np.maximum(np.linalg.norm(p["W_dec"], axis=1), 1e-12)
        p["W_dec"] /= norms[:, None]
        p["W_enc"] *= norms[None, :]
        p["b_enc"] *= norms
        if "threshold" in p:
            p["threshold"] *= norms
    hook_name, _, hook_id = _store_hook(source, 0)
    out_name, _, out_id = _store_hook(source, len(source.views) - 1) if transcoder else (None, None, None)
    manifest = source.store.manifest if source.store is not None else {}
    meta = {"mlx_engine": {
        "trainer": "mlx_engine.sae.train", "training": cfg.to_json(), "hook_id": hook_id, "hook_id_out": out_id,
        "activation_norm_scaling_factor": c_in, **({"target_norm_scaling_factor": c_out} if transcoder else {}),
        "store": str(source.store.path) if source.store is not None else None, "steps": state.step,
    }}
    config = SAEConfig(
        arch, d_in=source.widths[0], d_sae=cfg.d_sae, d_out=source.widths[-1], transcoder=transcoder,
        k=cfg.top_k if arch == "topk" else None, apply_b_dec_to_input=not transcoder, hook_name=hook_name,
        hook_name_out=out_name, model_name=(manifest.get("model") or {}).get("id"), context_size=manifest.get("context_size"),
        metadata=meta,
    )
    return SAE(config, {k: v.astype(np.float32) for k, v in p.items()})


def _evaluate(cfg: TrainConfig, sae: SAE, state: TrainState, source: Source, schedule: dict[str, int],
              model: Any, eval_ce: bool) -> dict[str, Any]:
    metrics: dict[str, Any] = {"dead_fraction_training": float(np.mean(state.since_fired >= schedule["dead"])),
                               "train_tokens": state.step * cfg.batch_size}
    held = source.heldout()
    if len(held[0]):
        rec = reconstruction_metrics(sae, held[0], held[-1], dense_threshold=cfg.dense_threshold, batch_size=cfg.batch_size)
        rec.pop("frac_active")
        metrics.update({f"heldout_{k}": v for k, v in rec.items()})
    windows = heldout_windows(source, cfg.eval_windows)
    if eval_ce and windows and source.store is not None:
        from ..loading import load_model

        kit = model if model is not None and not isinstance(model, (str, Path)) else None
        if kit is None:
            m = source.store.manifest["model"]
            kit = load_model(model or (m["path"] if Path(m["path"]).exists() else m["id"]))
        metrics.update(ce_loss_recovered(kit, sae, windows, hook=source.names[0], hook_out=source.names[-1]))
    return metrics


def train(
    data: Data, hook: Optional[str] = None, d_sae: Optional[int] = None, out: Optional[Union[str, Path]] = None, *,
    target_hook: Optional[str] = None, target: Optional[np.ndarray] = None, model: Any = None, eval_ce: bool = True,
    progress: bool = True, **options: Any,
) -> TrainResult:
    """Train an SAE on `hook` of a store (a folder or ActivationStore; or rows [N, d_in] as an array).

    `target_hook` (or `target` rows) makes it a transcoder predicting that hook from `hook`.
    `options` are TrainConfig's fields (architecture, k, l1, lr, tokens, batch_size, seed, ...).
    `model` (a ModelKit or a path; default: the store's model) serves the downstream CE.
    """
    cfg = _config(d_sae, options)
    if out is None:
        raise SAEError("give out, the folder the SAE (and its checkpoints) are written to.")
    source = open_source(data, hook, target_hook, cfg.eval_tokens, target)
    transcoder = len(source.views) == 2
    stream = BatchStream(source, cfg.batch_size, cfg.seed, cfg.shuffle_block, cfg.shuffle_buffer)
    steps = max(1, cfg.tokens // cfg.batch_size) if cfg.tokens else stream.steps_per_epoch
    settings = {k: v for k, v in cfg.to_json().items() if k != "checkpoint_every"}  # how often to save changes no result
    fingerprint = hashlib.sha256(json.dumps({"config": settings, "data": source.identity(), "steps": steps,
                                             "widths": source.widths}, sort_keys=True).encode()).hexdigest()
    folder = Path(out).expanduser()
    done = folder / TRAINING_FILE
    if done.exists():
        record = json.loads(done.read_text(encoding="utf-8"))
        if record.get("fingerprint") != fingerprint:
            raise SAEError(f"{folder} holds a finished run with other settings or data; give a new out folder.")
        if record.get("status") == "complete":
            return TrainResult(load_sae(folder), record["metrics"], folder, record["history"])
    folder.mkdir(parents=True, exist_ok=True)
    state = load_checkpoint(folder, fingerprint) or _start(cfg, source, transcoder)
    record = {"status": "running", "fingerprint": fingerprint, "config": cfg.to_json(), "data": source.identity(), "steps": steps}
    done.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    objective = Objective(cfg, source.widths[0], transcoder)
    opt = optim.Adam(learning_rate=cfg.lr, betas=[0.9, 0.999], bias_correction=True)
    opt.init(state.params)
    if state.opt_state:
        opt.state = state.opt_state
    schedule = cfg.schedule(steps)
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=state.step, unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc=f"sae {cfg.architecture} -> {folder.name}")
    started = time.perf_counter()
    c_in, c_out = mx.array(state.scales[0]), mx.array(state.scales[-1])
    try:
        for _, rows in stream.batches(state.step):
            if state.step >= steps:
                break
            x = mx.array(rows[0]) * c_in
            y = mx.array(rows[-1]) * c_out if transcoder else x
            line = _step(cfg, steps, state, objective, opt, x, y, schedule)
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == steps:
                state.history.append(line)
                bar.set_postfix({k: f"{line[k]:.3g}" for k in ("loss", "mse", "fve", "l0", "dead_fraction", "lr")}, refresh=False)
            if state.step % cfg.checkpoint_every == 0 and state.step < steps:
                save_checkpoint(folder, state, fingerprint)
    finally:
        bar.close()
    sae = _final_sae(cfg, state, source, transcoder)
    metrics = _evaluate(cfg, sae, state, source, schedule, model, eval_ce)
    metrics["train_seconds_this_run"] = time.perf_counter() - started
    save_sae(sae, folder)
    record.update(status="complete", metrics=metrics, history=state.history)
    done.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    remove_checkpoint(folder)
    return TrainResult(sae, metrics, folder, state.history)
