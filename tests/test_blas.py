"""The fast BLAS path on Linux: mlx_engine loads the system OpenBLAS before MLX, and the logits agree.

Each case runs in a fresh interpreter, since which BLAS MLX binds to is fixed when it loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_engine.blas import OPT_OUT, find_openblas

PROBE = """
import json, sys
import mlx_engine
import mlx.core as mx
kit = mlx_engine.load_model("default")
ids = mlx_engine.tokenize(kit, "def add(a, b):\\n    return a + b\\n")
logits = mlx_engine.run_with_cache(kit, ids).logits.astype(mx.float32)
print(json.dumps({"blas": mlx_engine.blas.state["blas"], "logits": logits.tolist()}))
"""


def probe(**env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="MLX's CPU backend and its BLAS are a Linux matter")
@pytest.mark.skipif(find_openblas() is None, reason="no system OpenBLAS installed (apt-get install libopenblas0-pthread)")
def test_openblas_is_loaded_by_default_and_gives_the_same_logits() -> None:
    fast = probe()
    slow = probe(**{OPT_OUT: "1"})
    assert fast["blas"] == "openblas" and slow["blas"] == "opted-out"
    # Two BLAS libraries sum in different orders: float32 rounding, nothing more.
    np.testing.assert_allclose(np.array(fast["logits"]), np.array(slow["logits"]), atol=2e-4, rtol=1e-4)
    assert np.array_equal(np.argmax(fast["logits"], -1), np.argmax(slow["logits"], -1))


def test_importing_mlx_first_is_said_not_hidden() -> None:
    code = "import warnings, mlx.core\nwarnings.simplefilter('always')\nimport mlx_engine\nprint(mlx_engine.blas.state['blas'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, OPT_OUT: ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("reference", "preloaded", "macos")
    if done.stdout.strip() == "reference":
        assert "imported before mlx_engine" in done.stderr
