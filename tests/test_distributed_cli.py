"""`mlx-engine generate --parallel tensor|pipeline` as a 2-rank job: rank 0 prints what one process prints.

Both ranks are started as mlx.launch starts them (MLX_RANK, MLX_HOSTFILE: ring backend on
127.0.0.1, ports found free), with bounded waits; the greedy text of rank 0 must be the
single-process text exactly, and rank 1 must write nothing at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed_tensor import free_ports

TIMEOUT_S = 120
PROMPT = "def encode(obj, indent=None):\n    if isinstance(obj, dict):"


def generate_argv(checkpoint: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlx_engine.cli", "generate", "--model", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "12", *extra]


def launch(argv: list[str], tmp: Path, n: int = 2) -> list[subprocess.CompletedProcess]:
    """Run `argv` as an n-rank ring job; each rank's completed process (killed ranks fail the test)."""
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(n)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(argv, env={**env, "MLX_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(n)
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {n}-rank job did not finish within {TIMEOUT_S}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return done


@pytest.fixture(scope="module")
def single_text(llama_checkpoint: Path) -> str:
    run = subprocess.run(generate_argv(llama_checkpoint), capture_output=True, text=True, timeout=TIMEOUT_S,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    return run.stdout


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_rank_0_prints_the_single_process_text_and_rank_1_nothing(llama_checkpoint: Path, single_text: str, parallel: str, tmp_path: Path) -> None:
    ranks = launch(generate_argv(llama_checkpoint, "--parallel", parallel), tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr[-2000:] for r in ranks]
    assert ranks[0].stdout == single_text
    assert "generated at" in ranks[0].stderr
    assert ranks[1].stdout == "" and ranks[1].stderr == ""


def test_a_rank_that_fails_says_so_on_its_own_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    ranks = launch(generate_argv(missing, "--parallel", "tensor"), tmp_path)
    assert all(r.returncode != 0 for r in ranks)
    assert "rank 1 of 2 failed" in ranks[1].stderr and "no-such-model" in ranks[1].stderr
