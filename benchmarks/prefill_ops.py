"""Where a prefill's time goes: the ops of one llama-125m layer, MLX against torch, same shapes.

    python -m benchmarks.prefill_ops [--lengths 512 1024 2048 4096 8192] [--repeats 5]

A standalone reproduction for MLX's CPU backend: each op of a decoder layer (the four
attention projections, the three MLP projections, RMS norm, RoPE, causal attention through
`mx.fast.scaled_dot_product_attention` and written out as matmul + softmax) timed alone on
the prompt's shapes, float32, against the torch op a transformers prefill runs, and attention
as our prefill runs it (mlx_engine/models/cpu_parallel.py). The sum over
a layer's ops, times the layer count, is set beside a whole prefill, so each op's share of
the gap is visible. Ops alternate between the two libraries so that a busy machine slows
both alike; each figure is the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import mlx_engine  # noqa: F401  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np

# llama-125m (mlx_engine/tools/synth): d_model 768, 12 heads of 64, d_mlp 3072, 12 layers.
D, HEADS, HEAD_DIM, D_MLP, LAYERS = 768, 12, 64, 3072, 12
ATTENTION_AS_RUN = "attention as each prefill runs it (ours: 512-query chunks, rows over one CPU stream per core; torch: one causal sdpa)"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ops(t: int) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (mlx op, torch op), each evaluated to completion."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)

    def pair(*shape: int) -> tuple[mx.array, "torch.Tensor"]:
        a = rng.standard_normal(shape).astype(np.float32) * 0.1
        return mx.array(a), torch.from_numpy(a)

    x_m, x_t = pair(t, D)
    wq_m, wq_t = pair(D, D)
    wup_m, wup_t = pair(D_MLP, D)
    wdown_m, wdown_t = pair(D, D_MLP)
    h_m, h_t = pair(t, D_MLP)
    g_m, g_t = pair(D)
    q_m, q_t = pair(1, HEADS, t, HEAD_DIM)
    k_m, k_t = pair(1, HEADS, t, HEAD_DIM)
    v_m, v_t = pair(1, HEADS, t, HEAD_DIM)
    scale = HEAD_DIM**-0.5
    mask_t = torch.full((t, t), float("-inf")).triu(1)
    inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)

    def rope_t() -> Any:
        half = HEAD_DIM // 2
        rot = torch.cat([-q_t[..., half:], q_t[..., :half]], -1)
        return q_t * cos + rot * sin

    def explicit_m() -> Any:
        s = (q_m * scale) @ k_m.transpose(0, 1, 3, 2)
        s = s + mx.triu(mx.full((t, t), -mx.inf), k=1)
        return mx.softmax(s, axis=-1, precise=True) @ v_m

    def explicit_t() -> Any:
        s = (q_t * scale) @ k_t.transpose(-1, -2) + mask_t
        return torch.softmax(s, -1) @ v_t

    chunk = 512  # our prefill's chunk: queries of one chunk against the keys so far

    def chunked_m() -> Any:
        outs = []
        for i in range(0, t, chunk):
            j = min(t, i + chunk)
            mask = mx.triu(mx.full((j - i, j), -mx.inf), k=i + 1)
            outs.append(mx.fast.scaled_dot_product_attention(q_m[:, :, i:j], k_m[:, :, :j], v_m[:, :, :j], scale=scale, mask=mask))
        return mx.eval(*outs)

    def ours_m() -> Any:
        from mlx_engine.models import cpu_parallel

        outs = []
        for i in range(0, t, chunk):
            j = min(t, i + chunk)
            outs.append(cpu_parallel.scaled_dot_product_attention(q_m[:, :, i:j], k_m[:, :, :j], v_m[:, :, :j], scale=scale, mask="causal"))
        return mx.eval(*outs)

    def chunked_t() -> Any:
        for i in range(0, t, chunk):
            j = min(t, i + chunk)
            F.scaled_dot_product_attention(q_t[:, :, i:j], k_t[:, :, :j], v_t[:, :, :j], attn_mask=mask_t[i:j, :j])

    s_m, s_t = pair(1, HEADS, t, t) if t <= 4096 else (None, None)
    ev = mx.eval
    softmax_ops = {} if s_m is None else {
        "softmax over [heads, t, t] (inside explicit attention)": (lambda: ev(mx.softmax(s_m, axis=-1)), lambda: torch.softmax(s_t, -1)),
    }
    return {
        **softmax_ops,
        "exp over t x d_mlp (the transcendental alone)": (lambda: ev(mx.exp(h_m)), lambda: torch.exp(h_t)),
        "attention, sdpa in 512-query chunks": (chunked_m, chunked_t),
        # Each library's prefill: ours in 512-query chunks through cpu_parallel, transformers' one causal sdpa call.
        ATTENTION_AS_RUN: (ours_m, lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True)),
        "projection d->d (x4 per layer)": (lambda: ev(x_m @ wq_m.T), lambda: x_t @ wq_t.T),
        "mlp up d->d_mlp (x2 per layer)": (lambda: ev(x_m @ wup_m.T), lambda: x_t @ wup_t.T),
        "mlp down d_mlp->d": (lambda: ev(h_m @ wdown_m.T), lambda: h_t @ wdown_t.T),
        "silu * up": (lambda: ev(h_m * mx.sigmoid(h_m) * h_m), lambda: F.silu(h_t) * h_t),
        "rms norm (x2 per layer)": (lambda: ev(mx.fast.rms_norm(x_m, g_m, 1e-5)),
                                    lambda: x_t * torch.rsqrt(x_t.pow(2).mean(-1, keepdim=True) + 1e-5) * g_t),
        "rope q (x2 per layer: q, k)": (lambda: ev(mx.fast.rope(q_m, HEAD_DIM, traditional=False, base=10000.0, scale=1.0, offset=0)),
                                        rope_t),
        "attention, fused sdpa causal": (
            lambda: ev(mx.fast.scaled_dot_product_attention(q_m, k_m, v_m, scale=scale, mask="causal")),
            lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, is_causal=True)),
        "attention, explicit (hooks armed)": (lambda: ev(explicit_m()), explicit_t),
    }


PER_LAYER = {"projection d->d (x4 per layer)": 4, "mlp up d->d_mlp (x2 per layer)": 2, "mlp down d_mlp->d": 1,
             "silu * up": 1, "rms norm (x2 per layer)": 2, "rope q (x2 per layer: q, k)": 2, ATTENTION_AS_RUN: 1}


def measure(t: int, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(torch.get_num_threads())
    rows = {}
    with torch.no_grad():
        for name, (mlx_op, torch_op) in _ops(t).items():
            m = _median_seconds(mlx_op, repeats)
            tt = _median_seconds(torch_op, repeats)
            rows[name] = {"mlx_s": m, "torch_s": tt, "ratio": m / tt}
    layer_m = sum(rows[k]["mlx_s"] * n for k, n in PER_LAYER.items())
    layer_t = sum(rows[k]["torch_s"] * n for k, n in PER_LAYER.items())
    shares = {k: rows[k]["mlx_s"] * n / layer_m for k, n in PER_LAYER.items()}
    return {"tokens": t, "ops": rows, "layer_mlx_s": layer_m, "layer_torch_s": layer_t,
            "model_mlx_s": layer_m * LAYERS, "model_torch_s": layer_t * LAYERS, "mlx_share": shares}


def markdown(results: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(name for r in results for name in r["ops"]))  # the softmax alone is skipped past 4096
    lines = ["| op | " + " | ".join(f"{r['tokens']} tok: MLX ms / torch ms (ratio, share of MLX layer)" for r in results) + " |",
             "|" + "---|" * (len(results) + 1)]
    for name in names:
        cells = []
        for r in results:
            o = r["ops"].get(name)
            if o is None:
                cells.append("not run at this length")
                continue
            share = r["mlx_share"].get(name)
            cells.append(f"{o['mlx_s'] * 1e3:.1f} / {o['torch_s'] * 1e3:.1f} ({o['ratio']:.2f}x"
                         + (f", {share:.0%})" if share is not None else ", not in the layer sum)"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| one layer's ops, summed | " + " | ".join(
        f"{r['layer_mlx_s'] * 1e3:.0f} / {r['layer_torch_s'] * 1e3:.0f} ({r['layer_mlx_s'] / r['layer_torch_s']:.2f}x)" for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefill_ops", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    results = []
    for t in args.lengths:
        results.append(measure(t, args.repeats))
        print(f"{t} tokens: one layer {results[-1]['layer_mlx_s'] * 1e3:.0f} ms MLX, {results[-1]['layer_torch_s'] * 1e3:.0f} ms torch",
              flush=True)
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
