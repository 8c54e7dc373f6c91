"""The benchmark harness runs end to end in quick mode, so it cannot rot unnoticed.

Quick mode writes into a temp dir; the committed benchmarks/RESULTS.md must not change.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "benchmarks" / "RESULTS.md"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def test_quick_benchmark_writes_a_results_report(tmp_path: Path) -> None:
    before = _digest(COMMITTED)
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digest(COMMITTED) == before

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    (model,) = results["models"].values()
    contenders = model["contenders"]
    for name in ("ours", "mlx_lm", "ours_residual", "ours_all10", "transformers"):
        rec = contenders[name]
        assert not rec["errors"], (name, rec["errors"])
        assert rec["decode_tps"]["median"] > 0 and rec["prefill_tps"]["median"] > 0
        assert rec["peak_rss"] > 50 * 2**20
        assert rec["tokens"] == model["trial"]["decode_tokens"]
    # Same weights, same greedy tokens: the contenders run the same model.
    assert contenders["ours"]["first_tokens"] == contenders["mlx_lm"]["first_tokens"]
    assert contenders["ours"]["first_tokens"] == contenders["ours_residual"]["first_tokens"]
    if "server" in contenders:
        assert contenders["server"]["decode_tps"]["median"] > 0

    wire = results["wire"]
    if "pending" not in wire:
        for part in ("one_step", "all_steps"):
            assert set(wire[part]) == {"json", "base64", "safetensors"}
            assert wire[part]["base64"]["wire_bytes"] < wire[part]["json"]["wire_bytes"]
    assert results["bandwidth"]["gb_per_s"] > 0
    assert results["kernels"]["reference BLAS"]["matvec float32 (GMAC/s)"] > 0

    report = (out / "RESULTS.md").read_text()
    for heading in ("## Machine and versions", "## Targets", "## Decode and prefill", "## What the numbers mean"):
        assert heading in report
    assert "python -m benchmarks --quick" in report
    assert results["versions"]["mlx"] in report
