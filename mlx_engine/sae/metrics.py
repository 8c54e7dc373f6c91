"""How good an SAE is: reconstruction metrics on rows, and the downstream CE with it spliced in.

Reconstruction (over held-out rows x, target y = x for an SAE):
  mse                 mean over tokens of sum_d (y - y_hat)^2 (SAELens's training MSE, raw units)
  fve                 fraction of variance explained, 1 - sum |y - y_hat|^2 / sum |y - mean(y)|^2
  l0                  mean number of non-zero features per token
  frac_active         per feature, the fraction of tokens where it fires
  dead_fraction       features that never fire on these rows
  dense_fraction      features firing on more than `dense_threshold` of the tokens
Downstream (SAELens's evals, "CE loss recovered"): on token windows, the next-token cross
entropy of the clean model, of the model with the hook replaced by the SAE's reconstruction
(without the error term), and with the hook zero-ablated;
  ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)   (1: lossless, 0: as bad as zeros).
A transcoder's prediction replaces its target hook (`hook_name_out`), computed from the clean input.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from .model import SAE, SAEError


def reconstruction_metrics(
    sae: SAE, x: np.ndarray, y: Optional[np.ndarray] = None, *, dense_threshold: float = 0.1, batch_size: int = 4096
) -> dict[str, Any]:
    """The reconstruction metrics of the module docstring over rows x [N, d_in] (target y, default x)."""
    y = x if y is None else y
    if len(x) == 0:
        raise SAEError("no rows to measure the SAE on.")
    sq_err = total = l0 = 0.0
    active = np.zeros(sae.d_sae, np.int64)
    mean = np.asarray(y, np.float64).mean(axis=0)
    var = float(np.sum((np.asarray(y, np.float64) - mean) ** 2))
    for lo in range(0, len(x), batch_size):
        xb = mx.array(np.asarray(x[lo : lo + batch_size], np.float32))
        yb = np.asarray(y[lo : lo + batch_size], np.float64)
        f, state = sae.encode_with_state(xb)
        y_hat = np.array(sae.decode(f, state).astype(mx.float32), dtype=np.float64)
        fired = np.array(f > 0)
        sq_err += float(np.sum((yb - y_hat) ** 2))
        l0 += float(fired.sum())
        active += fired.sum(axis=0)
        total += len(yb)
    freq = active / total
    return {
        "tokens": int(total), "mse": sq_err / total, "fve": 1.0 - sq_err / var if var > 0 else float("nan"),
        "l0": l0 / total, "dead_fraction": float(np.mean(active == 0)), "dense_fraction": float(np.mean(freq > dense_threshold)),
        "frac_active": freq,
    }


def _cross_entropy(logits: mx.array, tokens: Sequence[int]) -> tuple[float, int]:
    """Summed next-token CE (nats) of logits [T, V] on tokens [T], and the count of predictions."""
    logits = logits.astype(mx.float32)[:-1]
    targets = mx.array(list(tokens[1:]))
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return float(-mx.sum(mx.take_along_axis(logp, targets[:, None], axis=-1)).item()), len(tokens) - 1


def _as_rows(array: np.ndarray) -> np.ndarray:
    """A capture as [T, width]: per-head captures [H, T, D] flattened as the store and SAELens's hook_z do."""
    return array.transpose(1, 0, 2).reshape(array.shape[1], -1) if array.ndim == 3 else array


def _like(rows: np.ndarray, capture_shape: tuple[int, ...]) -> np.ndarray:
    if len(capture_shape) == 3:
        h, t, d = capture_shape
        return rows.reshape(t, h, d).transpose(1, 0, 2)
    return rows


def ce_loss_recovered(kit: Any, sae: SAE, windows: Sequence[Sequence[int]], *, hook: Optional[str] = None,
                      hook_out: Optional[str] = None) -> dict[str, float]:
    """CE clean / with the reconstruction spliced in / zero-ablated, and the fraction recovered (module docstring)."""
    from ..generation.api import run_with_cache

    hook = hook or sae.cfg.hook_name
    hook_out = hook_out or (sae.cfg.hook_name_out if sae.cfg.transcoder else None) or hook
    if hook is None or hook_out is None:
        raise SAEError("the SAE names no hook; pass hook= (and hook_out= for a transcoder).")
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    for tokens in windows:
        if len(tokens) < 2:
            continue
        names = [hook] if hook == hook_out else [hook, hook_out]
        clean = run_with_cache(kit, list(tokens), names)
        x = np.array(clean[hook].astype(mx.float32))
        out_shape = tuple(clean[hook_out].shape)
        y_hat = np.array(sae(mx.array(_as_rows(x))).astype(mx.float32))
        patched = run_with_cache(kit, list(tokens), [], interventions=[{"layer_name": hook_out, "op": "patch", "values": _like(y_hat, out_shape)}])
        zeroed = run_with_cache(kit, list(tokens), [], interventions=[{"layer_name": hook_out, "op": "zero"}])
        for name, cache in (("clean", clean), ("sae", patched), ("zero", zeroed)):
            ce, n = _cross_entropy(cache.logits, tokens)
            sums[name] += ce
        count += n
    if count == 0:
        raise SAEError("no window of two or more tokens to measure the downstream CE on.")
    ce = {k: v / count for k, v in sums.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap != 0 else float("nan"), "ce_tokens": count,
    }
