"""A training run's starting point: the normalisation constant, b_dec, and the initial weights."""

from __future__ import annotations

import numpy as np

from .config import TrainConfig


def geometric_median(points: np.ndarray, max_iter: int = 200, tol: float = 1e-7) -> np.ndarray:
    """The point minimising the sum of Euclidean distances to `points` [N, d] (Weiszfeld 1937).

    Weiszfeld's iteration y <- sum(w_i x_i) / sum(w_i), w_i = 1 / |x_i - y|, from the mean, in
    float64; distances are floored at 1e-12 so a point that coincides with y cannot divide by 0.
    The b_dec initialisation of Bricken et al. 2023 ("Towards Monosemanticity"), as SAELens's
    `compute_geometric_median`.
    """
    x = np.asarray(points, dtype=np.float64)
    y = x.mean(axis=0)
    for _ in range(max_iter):
        w = 1.0 / np.maximum(np.linalg.norm(x - y, axis=1), 1e-12)
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        moved = np.linalg.norm(new - y)
        y = new
        if moved <= tol * max(1.0, float(np.linalg.norm(y))):
            break
    return y


def norm_scale(rows: np.ndarray) -> float:
    """c with E|c x|^2 = d_in over `rows` (Anthropic, "Circuits Updates - April 2024": inputs scaled to a
    fixed mean squared norm, so hyperparameters carry across layers and models)."""
    mean_sq = float(np.mean(np.sum(np.asarray(rows, dtype=np.float64) ** 2, axis=1)))
    return float(np.sqrt(rows.shape[1] / mean_sq)) if mean_sq > 0 else 1.0


def initial_params(cfg: TrainConfig, d_in: int, d_out: int, b_dec: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """W_dec rows in random directions at norm 1 (unit-norm decoders) or 0.1 (the relu's folded decoder:
    Anthropic April 2024 update, SAELens's decoder_init_norm); W_enc the decoder's transpose where the
    shapes allow (Gao et al. 2024: "we initialize the encoder to the transpose of the decoder"), else
    random unit columns; b_enc 0; JumpReLU's threshold at its initial value."""
    w_dec = rng.standard_normal((cfg.d_sae, d_out))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    w_dec *= 1.0 if cfg.unit_decoder else 0.1
    if d_in == d_out:
        w_enc = w_dec.T.copy()
    else:
        w_enc = rng.standard_normal((d_in, cfg.d_sae))
        w_enc /= np.linalg.norm(w_enc, axis=0, keepdims=True)
        w_enc *= 1.0 if cfg.unit_decoder else 0.1
    params = {
        "W_enc": w_enc.astype(np.float32), "W_dec": w_dec.astype(np.float32),
        "b_enc": np.zeros(cfg.d_sae, np.float32), "b_dec": np.asarray(b_dec, np.float32),
    }
    if cfg.architecture == "jumprelu":
        params["threshold"] = np.full(cfg.d_sae, cfg.jumprelu_init_threshold, np.float32)
    return params


def initial_b_dec(cfg: TrainConfig, target_rows: np.ndarray, scale: float) -> np.ndarray:
    """b_dec in the normalised space: the geometric median or mean of the rows it offsets (the target's
    for a transcoder), or 0."""
    rows = np.asarray(target_rows, dtype=np.float64) * scale
    if cfg.b_dec_init == "zeros" or len(rows) == 0:
        return np.zeros(rows.shape[1], np.float32)
    centre = geometric_median(rows) if cfg.b_dec_init == "geometric_median" else rows.mean(axis=0)
    return np.asarray(centre, np.float32)
