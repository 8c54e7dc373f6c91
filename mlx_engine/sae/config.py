"""Training settings: one dataclass, checked before anything is read, with each default's source.

Architectures (`architecture`):
  relu       L1 penalty on f_i * |W_dec_i| (Anthropic, "Circuits Updates - April 2024"; SAELens's
             "standard"); decoder norms folded into the loss, not constrained; dead features
             resampled (Bricken et al. 2023, "Towards Monosemanticity").
  topk       the k largest pre-activations (Gao et al. 2024, "Scaling and evaluating sparse
             autoencoders"), unit-norm decoder rows, auxiliary-k loss on dead latents.
  batchtopk  the k * batch largest over the batch (Bussmann et al. 2024, "BatchTopK Sparse
             Autoencoders"); saved as JumpReLU with the running threshold (as SAELens saves it).
  jumprelu   JumpReLU with an L0 penalty and straight-through estimators (Rajamanoharan et al.
             2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU SAEs").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .model import SAEError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DECODERS = ("auto", "unit", "folded")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result (and so whether a checkpoint may resume it)."""

    d_sae: int
    architecture: str = "topk"
    k: Optional[int] = None  # topk / batchtopk: active latents per token (default 32, at most d_sae)
    l1: Optional[float] = None  # relu: L1 coefficient (default 5.0); jumprelu: L0 coefficient (default 1e-3)
    lr: float = 3e-4  # Adam (Kingma & Ba 2015), betas (0.9, 0.999), bias-corrected; SAELens's default lr
    tokens: Optional[int] = None  # training tokens (default: one pass over the training rows)
    batch_size: int = 4096
    seed: int = 0
    b_dec_init: str = "geometric_median"  # Bricken et al. 2023 (Weiszfeld's algorithm), or "mean", "zeros"
    normalize: bool = True  # scale to mean squared norm d_in (Anthropic April 2024 update); folded on save
    decoder: str = "auto"  # "unit" rows (Bricken 2023, Gao 2024) or "folded" into the L1 (relu's default)
    lr_warm_up_steps: Optional[int] = None  # linear warm-up (default 5% of the steps)
    lr_decay_steps: Optional[int] = None  # linear decay to 0 over the last steps (default 20%; Anthropic April 2024)
    l1_warm_up_steps: Optional[int] = None  # sparsity coefficient ramped from 0 (default 5%; Anthropic April 2024)
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing (Gao et al. 2024)
    aux_k: Optional[int] = None  # auxiliary-k latents (default d_in // 2; Gao et al. 2024, appendix A.2)
    aux_k_coefficient: float = 1 / 32  # alpha of the auxiliary loss (Gao et al. 2024)
    resample_every: Optional[int] = None  # relu: resample dead latents every N steps in the first half (default 25%)
    jumprelu_bandwidth: float = 0.05  # STE kernel width (SAELens's default; the paper uses 0.001 unnormalised)
    jumprelu_init_threshold: float = 0.01  # SAELens's default
    batchtopk_threshold_lr: float = 0.01  # EMA rate of the inference threshold (SAELens's topk_threshold_lr)
    grad_clip: float = 1.0  # global gradient norm (Anthropic April 2024 update)
    shuffle_block: int = 65536  # rows per shuffle block; a buffer of `shuffle_buffer` blocks is permuted
    shuffle_buffer: int = 4
    init_rows: int = 16384  # rows sampled for b_dec and the normalisation constant
    eval_tokens: int = 8192  # held-out rows (whole documents at the end of a store)
    eval_windows: int = 16  # held-out token windows for the downstream CE
    dense_threshold: float = 0.1  # a latent firing on more than this fraction of tokens is dense
    checkpoint_every: int = 1000  # steps
    log_every: int = 50  # steps

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"Unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}.")
        for name in ("d_sae", "batch_size", "shuffle_block", "shuffle_buffer", "init_rows", "checkpoint_every", "log_every", "dead_tokens"):
            _positive_int(name, getattr(self, name))
        for name in ("k", "tokens", "aux_k", "resample_every", "lr_warm_up_steps", "lr_decay_steps", "l1_warm_up_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in ("k", "tokens", "aux_k", "resample_every") else 0)):
                raise SAEError(f"{name} must be a {'positive' if name in ('k', 'tokens', 'aux_k', 'resample_every') else 'non-negative'} integer, got {value!r}.")
        if self.k is not None and self.k > self.d_sae:
            raise SAEError(f"k ({self.k}) cannot exceed d_sae ({self.d_sae}).")
        if self.k is not None and self.architecture not in ("topk", "batchtopk"):
            raise SAEError(f"k applies to topk and batchtopk; {self.architecture} sets its sparsity with l1.")
        if self.l1 is not None and self.architecture not in ("relu", "jumprelu"):
            raise SAEError(f"l1 applies to relu (L1) and jumprelu (L0); {self.architecture} sets its sparsity with k.")
        for name in ("lr", "grad_clip", "jumprelu_bandwidth", "aux_k_coefficient"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise SAEError(f"{name} must be a positive number, got {value!r}.")
        if self.l1 is not None and (not math.isfinite(self.l1) or self.l1 < 0):
            raise SAEError(f"l1 must be a non-negative number, got {self.l1!r}.")
        if self.b_dec_init not in B_DEC_INITS:
            raise SAEError(f"b_dec_init must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}.")
        if self.decoder not in DECODERS:
            raise SAEError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}.")
        if not 0 < self.dense_threshold <= 1:
            raise SAEError(f"dense_threshold must be in (0, 1], got {self.dense_threshold!r}.")
        if self.eval_tokens < 0 or self.eval_windows < 0:
            raise SAEError("eval_tokens and eval_windows must be 0 or more.")

    @property
    def top_k(self) -> int:
        return min(self.k or 32, self.d_sae)

    @property
    def sparsity(self) -> float:
        if self.l1 is not None:
            return float(self.l1)
        return 5.0 if self.architecture == "relu" else 1e-3

    @property
    def unit_decoder(self) -> bool:
        return self.decoder == "unit" or (self.decoder == "auto" and self.architecture != "relu")

    def schedule(self, steps: int) -> dict[str, int]:
        """Step counts of the schedules for a run of `steps` steps."""
        return {
            "lr_warm_up": self.lr_warm_up_steps if self.lr_warm_up_steps is not None else steps // 20,
            "lr_decay": self.lr_decay_steps if self.lr_decay_steps is not None else steps // 5,
            "l1_warm_up": self.l1_warm_up_steps if self.l1_warm_up_steps is not None else steps // 20,
            "dead": max(1, min(-(-self.dead_tokens // self.batch_size), max(1, steps // 4))),
            "resample": self.resample_every or max(1, steps // 4),
        }

    def lr_at(self, step: int, steps: int) -> float:
        s = self.schedule(steps)
        warm = min(1.0, (step + 1) / s["lr_warm_up"]) if s["lr_warm_up"] else 1.0
        left = steps - step
        decay = min(1.0, left / s["lr_decay"]) if s["lr_decay"] else 1.0
        return self.lr * warm * decay

    def sparsity_at(self, step: int, steps: int) -> float:
        warm = self.schedule(steps)["l1_warm_up"]
        return self.sparsity * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEError(f"{name} must be a positive integer, got {value!r}.")
