"""What the numbers were measured on: the machine, the versions, memory bandwidth, and
the speed of the CPU kernels decode leans on (with and without OpenBLAS preloaded)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Optional

import numpy as np

from mlx_engine.blas import find_openblas  # noqa: F401  (where the engine looks is where the benchmarks look)


def machine_table(r: dict[str, Any], *load_rows: str) -> list[str]:
    """The "## Machine" section of a generated report: the machine, then `load_rows` (already "| k | v |"), then the versions."""
    return ["## Machine", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in r["machine"].items()], *load_rows,
            *[f"| {k} | {v} |" for k, v in r["versions"].items()], ""]


def machine_summary() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        wanted = ("Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                  "L1d cache", "L2 cache", "L3 cache", "Flags")
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in wanted:
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split() if f.startswith(("avx", "fma", "f16c", "amx", "sve", "neon")))
                info[key.strip()] = value
    except (OSError, subprocess.CalledProcessError):
        info["Model name"] = platform.processor()
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    info["load_average"] = os.getloadavg()
    return info


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mlx", "mlx-lm", "transformers", "torch", "numpy", "tokenizers", "safetensors", "flask", "waitress"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out["mlx-engine"] = metadata.version("mlx-engine")
    except metadata.PackageNotFoundError:
        out["mlx-engine"] = "not installed"
    return out


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth: best of `repeats` full passes of numpy's sum over a float32 array.

    numpy's sum is one thread; it is the bandwidth one decoding thread can draw, which
    is how MLX's CPU kernels run a matrix-vector product.
    """
    a = np.ones(int(gib * 2**30 / 4), dtype=np.float32)
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return {"bytes": float(a.nbytes), "seconds": best, "gb_per_s": a.nbytes / best / 1e9}


KERNEL_SCRIPT = r"""
import json, time, mlx.core as mx
N, K, M, BUDGET = {n}, {k}, {m}, {budget}
out = {{}}
def rate(fn, work):
    mx.eval(fn())
    reps, t = 0, time.perf_counter()
    while True:
        mx.eval(fn())
        reps += 1
        elapsed = time.perf_counter() - t
        if elapsed > BUDGET:
            return work * reps / elapsed / 1e9
w = mx.random.normal((N, K))
x = mx.random.normal((1, K))
xm = mx.random.normal((M, K))
for name, dt in (("float32", mx.float32), ("float16", mx.float16), ("bfloat16", mx.bfloat16)):
    ww, xx, xxm = w.astype(dt), x.astype(dt), xm.astype(dt)
    mx.eval(ww, xx, xxm)
    out[f"matvec {{name}} (GMAC/s)"] = rate(lambda: xx @ ww.T, N * K)
    out[f"matmul {{name}} (GFLOP/s)"] = rate(lambda: xxm @ ww.T, 2 * N * K * M)
    wq, s, b = mx.quantize(ww, group_size=64, bits=4)
    mx.eval(wq, s, b)
    out[f"matvec 4-bit, {{name}} scales (GMAC/s)"] = rate(
        lambda: mx.quantized_matmul(xx, wq, s, b, transpose=True, group_size=64, bits=4), N * K)
    out[f"matmul 4-bit, {{name}} scales (GFLOP/s)"] = rate(
        lambda: mx.quantized_matmul(xxm, wq, s, b, transpose=True, group_size=64, bits=4), 2 * N * K * M)
print("@@ " + json.dumps(out))
"""


def kernel_rates(openblas: Optional[str], quick: bool) -> dict[str, float]:
    """Matrix-vector (decode) and matrix-matrix (prefill) rates of MLX's CPU kernels."""
    n, k, m = (512, 512, 8) if quick else (4096, 2048, 16)
    env = dict(os.environ)
    if openblas:
        env["LD_PRELOAD"] = openblas
    script = KERNEL_SCRIPT.format(n=n, k=k, m=m, budget=0.2 if quick else 1.0)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    line = next(l for l in result.stdout.splitlines() if l.startswith("@@ "))
    return {**json.loads(line[3:]), "shape": f"[{n}x{k}] weights, {m} rows for matmul"}
