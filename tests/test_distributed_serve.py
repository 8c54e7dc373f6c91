"""Serving from rank 0 (distributed/serve.py): the other ranks follow every call in lockstep, over 2 ring ranks.

tests/distributed_serve_rank.py runs the same sequence of calls a server makes: rank 0 leads
(a generation with every hook, a client leaving after 3 tokens, a prefill stopped by
should_stop, an edit, sampling without a seed), rank 1 follows and records the tokens of
every step it ran. Rank 0's results must equal the single-process ones (ATOL/RTOL 1e-4 as in
tests/test_distributed_tensor.py), rank 1 must have run exactly the steps rank 0 ran, with the
same tokens, and a rank killed mid-generation must make rank 0 fail with RankLostError within
a bounded time. The HTTP server itself is not started here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import distributed_serve_rank
import numpy as np
import pytest
import tiny_checkpoints as tc
from test_distributed_tensor import _compare, free_ports

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

SCRIPT = Path(__file__).parent / "distributed_serve_rank.py"
TIMEOUT_S = 120
ERROR_WITHIN_S = 30  # a lost peer surfaces at the next collective; the ring backend reports it at once


def start(checkpoint: Path, out_dir: Path, parallel: str, mode: str, n: int = 2) -> list[subprocess.Popen]:
    hostfile = out_dir / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(n)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(checkpoint), str(out_dir), parallel, mode],
            env={**env, "MLX_RANK": str(r)}, stdout=open(out_dir / f"rank{r}.log", "w"), stderr=subprocess.STDOUT,
        )
        for r in range(n)
    ]


def finish(procs: list[subprocess.Popen], out_dir: Path, timeout: float = TIMEOUT_S) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        logs = "\n".join((out_dir / f"rank{r}.log").read_text()[-3000:] for r in range(len(procs)))
        pytest.fail(f"the serving job did not finish within {timeout}s:\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, llama_checkpoint: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import mlx.core as mx

    import mlx_engine
    from mlx_engine.distributed.serve import Leader

    out_dir = tmp_path_factory.mktemp(f"serve_{request.param}")
    single: dict[str, Any] = {}
    distributed_serve_rank.lead(mlx_engine.load_model(llama_checkpoint), Leader(mx.distributed.init()), single)
    codes = finish(start(llama_checkpoint, out_dir, request.param, "serve"), out_dir)
    logs = [(out_dir / f"rank{r}.log").read_text()[-3000:] for r in range(2)]
    assert codes == [0, 0], logs
    return single, [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(2)]


def test_rank_0_serves_the_single_process_results(served) -> None:
    single, (leader, _) = served
    _compare("leader", leader, single, "all_hooks/")
    _compare("leader", leader, single, "edit/residual_steer/")
    np.testing.assert_array_equal(leader["left/tokens"], single["left/tokens"])
    assert bool(leader["cancelled"]) and bool(single["cancelled"])


def test_the_follower_ran_exactly_the_steps_rank_0_ran(served, llama_kit) -> None:
    _, (leader, follower) = served
    assert int(follower["followed"]) == 5  # the shutdown ended its loop after the five calls
    np.testing.assert_array_equal(follower["call1/tokens"], leader["all_hooks/tokens"])
    np.testing.assert_array_equal(follower["call2/tokens"], leader["left/tokens"])  # stopped when the client left
    assert "call3/tokens" not in follower  # the prefill stopped on both ranks before a token
    np.testing.assert_array_equal(follower["call4/tokens"], leader["edit/residual_steer/tokens"])
    np.testing.assert_array_equal(follower["call5/tokens"], leader["sampled/tokens"])  # rank 0's seed reached it
    # Sampled with rank 0's random seed: it may draw the end-of-sequence token before the last step.
    sampled = leader["sampled/tokens"]
    assert 1 <= len(sampled) <= distributed_serve_rank.STEPS
    assert len(sampled) == distributed_serve_rank.STEPS or int(sampled[-1]) in llama_kit.eos_token_ids, sampled


def test_a_rank_killed_mid_generation_makes_rank_0_fail_with_a_clear_error(tmp_path: Path) -> None:
    checkpoint, _ = tc.build_llama(tmp_path / "src")
    procs = start(checkpoint, tmp_path, "tensor", "killed")
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-3000:]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=30)
    (tmp_path / "killed").write_text("1")
    assert finish(procs[:1], tmp_path, timeout=ERROR_WITHIN_S + 30) == [0], (tmp_path / "rank0.log").read_text()[-3000:]
    got = dict(np.load(tmp_path / "rank0.npz"))
    assert "stopped answering" in str(got["error"]) and "restart the job" in str(got["error"])
    assert float(got["seconds_to_error"]) < ERROR_WITHIN_S
    assert "lost a rank earlier" in str(got["refused_after"])
