"""Each architecture's training forward pass and loss, in MLX (functions of a parameter dict).

All losses are in the normalised space (inputs scaled to mean squared norm d_in) and per token
as SAELens computes them: the reconstruction term is sum over features of (x_hat - y)^2,
averaged over the batch.
  relu       + lambda * sum_i f_i |W_dec_i|      (Anthropic April 2024 update; SAELens "standard")
  topk       + alpha * auxk                      (Gao et al. 2024)
  batchtopk  + alpha * auxk, with the k * B largest activations of the batch kept (Bussmann et al. 2024)
  jumprelu   + lambda * sum_i H(pre_i - theta_i) (Rajamanoharan et al. 2024)
The auxiliary-k loss (Gao et al. 2024, appendix A.2): the k_aux largest pre-activations among
dead latents reconstruct the main reconstruction's error e = y - x_hat (held fixed) through the
decoder without its bias; auxk = |e - e_hat|^2 / |e|^2 summed over the batch.
JumpReLU's threshold learns through straight-through estimators with a rectangle kernel of width
epsilon: d/dtheta of z * H(z - theta) is -(theta / eps) K((z - theta) / eps), and of H(z - theta)
is -(1 / eps) K((z - theta) / eps); the gradient to z is H(z - theta) and 0 (the paper's choice).
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx

from .config import TrainConfig
from .model import top_k_relu

Params = dict[str, mx.array]


def _rectangle(u: mx.array) -> mx.array:
    return (mx.abs(u) < 0.5).astype(u.dtype)


def jumprelu_functions(eps: float) -> tuple[Callable[..., mx.array], Callable[..., mx.array]]:
    """(jumprelu(z, theta), step(z, theta)) with the straight-through gradients of the module docstring."""

    @mx.custom_function
    def jumprelu(z: mx.array, theta: mx.array) -> mx.array:
        return z * (z > theta).astype(z.dtype)

    @jumprelu.vjp
    def _jumprelu_vjp(primals: Any, cotangent: mx.array, output: Any) -> tuple[mx.array, mx.array]:
        z, theta = primals
        grad_theta = -(theta / eps) * _rectangle((z - theta) / eps) * cotangent
        return (z > theta).astype(z.dtype) * cotangent, mx.sum(grad_theta, axis=0)

    @mx.custom_function
    def step(z: mx.array, theta: mx.array) -> mx.array:
        return (z > theta).astype(z.dtype)

    @step.vjp
    def _step_vjp(primals: Any, cotangent: mx.array, output: Any) -> tuple[mx.array, mx.array]:
        z, theta = primals
        grad_theta = -(1.0 / eps) * _rectangle((z - theta) / eps) * cotangent
        return mx.zeros_like(z), mx.sum(grad_theta, axis=0)

    return jumprelu, step


def batch_top_k(acts: mx.array, k: int) -> mx.array:
    """The k * B largest entries of the whole batch of (non-negative) activations, 0 elsewhere."""
    flat = acts.reshape(-1)
    keep = min(k * acts.shape[0], flat.size)
    ids = mx.stop_gradient(mx.argpartition(-flat, kth=keep - 1)[:keep])
    out = mx.put_along_axis(mx.zeros_like(flat), ids, mx.take(flat, ids), axis=0)
    return out.reshape(acts.shape)


class Objective:
    """The training forward and loss of one configuration (`loss` is what value_and_grad differentiates)."""

    def __init__(self, cfg: TrainConfig, d_in: int, transcoder: bool) -> None:
        self.cfg = cfg
        self.apply_b_dec = not transcoder  # SAELens transcoders never subtract b_dec from the input
        self.k = cfg.top_k
        self.k_aux = min(cfg.aux_k or max(1, d_in // 2), cfg.d_sae)
        self.jumprelu, self.step = jumprelu_functions(cfg.jumprelu_bandwidth)

    def pre(self, p: Params, x: mx.array) -> mx.array:
        sae_in = x - p["b_dec"] if self.apply_b_dec else x
        return sae_in @ p["W_enc"] + p["b_enc"]

    def activate(self, p: Params, pre: mx.array) -> mx.array:
        arch = self.cfg.architecture
        if arch == "topk":
            return top_k_relu(pre, self.k)
        if arch == "batchtopk":
            return batch_top_k(mx.maximum(pre, 0), self.k)
        if arch == "jumprelu":
            return self.jumprelu(pre, p["threshold"])
        return mx.maximum(pre, 0)

    def forward(self, p: Params, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(pre-activations, features, reconstruction)."""
        pre = self.pre(p, x)
        f = self.activate(p, pre)
        return pre, f, f @ p["W_dec"] + p["b_dec"]

    def aux_k_loss(self, p: Params, pre: mx.array, error: mx.array, dead: mx.array, n_dead: int) -> mx.array:
        """Gao et al.'s auxiliary loss over the dead latents (`dead` a [d_sae] bool mask)."""
        if n_dead == 0:
            return mx.array(0.0)
        k_aux = min(self.k_aux, n_dead)
        masked = mx.where(dead, pre, mx.array(-mx.inf, dtype=pre.dtype))
        e_hat = top_k_relu(masked, k_aux) @ p["W_dec"]
        return mx.sum((e_hat - error) ** 2) / mx.maximum(mx.sum(error * error), 1e-12)

    def loss(self, p: Params, x: mx.array, y: mx.array, coefficient: mx.array, dead: mx.array, n_dead: int) -> tuple[mx.array, ...]:
        """(total, mse, sparsity term, aux term, features, reconstruction)."""
        pre, f, x_hat = self.forward(p, x)
        mse = mx.mean(mx.sum((x_hat - y) ** 2, axis=-1))
        arch = self.cfg.architecture
        zero = mx.array(0.0)
        sparsity, aux = zero, zero
        if arch == "relu":
            sparsity = coefficient * mx.mean(mx.sum(f * mx.linalg.norm(p["W_dec"], axis=-1), axis=-1))
        elif arch == "jumprelu":
            sparsity = coefficient * mx.mean(mx.sum(self.step(pre, p["threshold"]), axis=-1))
        else:
            aux = self.cfg.aux_k_coefficient * self.aux_k_loss(p, pre, mx.stop_gradient(y - x_hat), dead, n_dead)
        return mse + sparsity + aux, mse, sparsity, aux, f, x_hat


def project_decoder_gradient(grads: Params, p: Params) -> Params:
    """Remove the part of W_dec's gradient along each (unit) decoder row, so the step does not
    fight the renormalisation that follows (Bricken et al. 2023; Gao et al. 2024)."""
    g, w = grads["W_dec"], p["W_dec"]
    return {**grads, "W_dec": g - mx.sum(g * w, axis=-1, keepdims=True) * w}


def renormalize_decoder(p: Params) -> Params:
    w = p["W_dec"]
    return {**p, "W_dec": w / mx.maximum(mx.linalg.norm(w, axis=-1, keepdims=True), 1e-12)}
