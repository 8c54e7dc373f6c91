"""The fast BLAS path on Linux: load the system OpenBLAS before MLX, so MLX's CPU backend uses it.

The `mlx[cpu]` wheel for Linux resolves its BLAS symbols (`cblas_sgemm`, ...) at load time
from whatever is already in the process, and falls back to the reference BLAS it carries:
correct, and about 50x slower on a 1024x1024 float32 matmul on the machines we measured.
Loading Debian's `libopenblas0-pthread` with RTLD_GLOBAL before `mlx.core` is imported
makes MLX bind to OpenBLAS instead, with no LD_PRELOAD. This runs once, when `mlx_engine`
is imported; it does nothing on macOS (Metal, Accelerate), when MLX is already imported
(then it can only say so), or when `MLX_ENGINE_NO_OPENBLAS=1`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

OPT_OUT = "MLX_ENGINE_NO_OPENBLAS"
# Debian/Ubuntu (pthread and openmp flavours), Fedora; MLX_ENGINE_OPENBLAS names another.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
HOW_TO_GET_IT = (
    "MLX is running on its bundled reference BLAS, which is many times slower on the CPU. Install OpenBLAS "
    "(Debian/Ubuntu: `sudo apt-get install libopenblas0-pthread`) and mlx-engine loads it before MLX by "
    f"itself; set {OPT_OUT}=1 to silence this."
)

# What this process runs: "openblas" (with its path), "reference", "macos" or "opted-out".
state: dict[str, Optional[str]] = {"blas": None, "path": None}


def find_openblas() -> Optional[str]:
    """The system OpenBLAS library, if installed (MLX_ENGINE_OPENBLAS first)."""
    explicit = os.environ.get("MLX_ENGINE_OPENBLAS")
    for path in ((explicit,) if explicit else ()) + CANDIDATES:
        if path and Path(path).exists():
            return path
    return None


def ensure_fast_blas() -> str:
    """Load OpenBLAS before MLX where that helps; answer which BLAS the process runs (see `state`)."""
    if state["blas"] is not None:
        return state["blas"]
    if sys.platform != "linux":
        state["blas"] = "macos"
    elif os.environ.get(OPT_OUT, "") not in ("", "0"):
        state["blas"] = "opted-out"
    elif "mlx.core" in sys.modules:
        state["blas"] = "preloaded" if os.environ.get("LD_PRELOAD", "").find("openblas") >= 0 else "reference"
        if state["blas"] == "reference":
            warnings.warn("mlx was imported before mlx_engine, so OpenBLAS could not be loaded first. " + HOW_TO_GET_IT, stacklevel=3)
    else:
        path = find_openblas()
        if path is None:
            state["blas"] = "reference"
            warnings.warn(HOW_TO_GET_IT, stacklevel=3)
        else:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            state["blas"], state["path"] = "openblas", path
    return state["blas"]
