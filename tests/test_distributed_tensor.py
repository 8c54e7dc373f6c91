"""Tensor parallelism over 2 ranks equals the single-process run: logits, tokens, every capture, every edit.

Each test job starts 2 rank processes (tests/distributed_rank.py) on 127.0.0.1 with the
ring backend (MLX_RANK, MLX_HOSTFILE; ports found free by binding port 0), waits for them
with a timeout, and kills whatever is left. Both ranks write everything they saw; the
parent runs the same scenarios on an ordinary single-process load and compares:

- tokens (greedy) and capture metadata (shapes, positions, key positions, dtype): identical;
- logits, logprobs and capture data: within ATOL/RTOL. Splitting o_proj and down_proj over
  ranks reorders float32 sums (two partial products, then all_sum), so bit-equality is not
  expected; 1e-4 is orders of magnitude above the observed differences and far below any
  real error (a head in the wrong place moves values by O(0.1)).
- rank 1's results equal rank 0's exactly: every rank is handed the same captures.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import distributed_rank
import numpy as np
import pytest
import tiny_checkpoints as tc

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

ATOL = 1e-4
RTOL = 1e-4
RANKS = 2
JOB_TIMEOUT_S = 120
PER_CHECKPOINT_S = 60  # a matrix job's timeout grows with its checkpoints
RANK_SCRIPT = Path(__file__).parent / "distributed_rank.py"


def free_ports(n: int) -> list[int]:
    """n loopback ports the OS just handed out (bound to port 0, then released for the ranks)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_matrix(
    checkpoints: dict[str, Path], out_dir: Path, parallel: str = "tensor", n: int = RANKS
) -> dict[str, list[dict[str, np.ndarray]]]:
    """One n-rank job that runs every checkpoint in turn; each checkpoint's results, by rank.

    The ranks start once for the whole matrix: most of a rank's start is importing MLX,
    transformers and torch, which per checkpoint would cost more than the checkpoint itself.
    """
    jobs = out_dir / "jobs.json"
    jobs.write_text(json.dumps({name: str(path) for name, path in checkpoints.items()}))
    run_ranks(jobs, out_dir, n=n, timeout=JOB_TIMEOUT_S + PER_CHECKPOINT_S * len(checkpoints), parallel=parallel, read=False)
    return {name: [dict(np.load(out_dir / name / f"rank{r}.npz")) for r in range(n)] for name in checkpoints}


def run_ranks(
    checkpoint: Path, out_dir: Path, n: int = RANKS, timeout: float = JOB_TIMEOUT_S, parallel: str = "tensor",
    read: bool = True,
) -> list[dict[str, np.ndarray]]:
    """Run the rank script as an n-rank ring job on 127.0.0.1; every rank's results, by rank (with `read`)."""
    hostfile = out_dir / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(n)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    codes: Optional[list[int]] = None
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(out_dir / f"rank{r}.log", "w+")) for r in range(n)]
        procs: list[subprocess.Popen] = []
        try:
            for r in range(n):
                procs.append(subprocess.Popen(
                    [sys.executable, str(RANK_SCRIPT), str(checkpoint), str(out_dir), parallel],
                    env={**env, "MLX_RANK": str(r)}, stdout=logs[r], stderr=subprocess.STDOUT,
                ))
            codes = [p.wait(timeout=timeout) for p in procs]
        except subprocess.TimeoutExpired:
            codes = None
        finally:  # a rank left waiting on a dead peer would block forever: kill every one still running
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)
        text = []
        for r, log in enumerate(logs):
            log.seek(0)
            text.append(f"--- rank {r} ---\n{log.read()[-4000:]}")
    if codes is None or any(codes):
        pytest.fail(f"rank job failed (exit codes {codes}, timeout {timeout}s):\n" + "\n".join(text))
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(n)] if read else []


def single_process(checkpoint: Path) -> dict[str, Any]:
    import mlx_engine

    return distributed_rank.scenarios(mlx_engine.load_model(checkpoint))


def quantized(src: Path, dst: Path) -> Path:
    from mlx_engine.tools.convert import quantize_checkpoint

    # group_size 32: o_proj and down_proj keep whole quantization groups on each of 2 ranks.
    return quantize_checkpoint(src, dst, bits=4, group_size=32)


def qwen3(tmp: Path) -> Path:
    from test_qwen3 import build_qwen3

    return build_qwen3(tmp / "src")[0]


def qwen3_moe(tmp: Path) -> Path:
    from test_qwen3_moe import build_qwen3_moe

    # "mixed": sparse blocks 0 and 2 around a dense block 1, sliding windows, renormalised routing.
    return build_qwen3_moe(tmp / "src", "mixed")


def phi3(tmp: Path) -> Path:
    from test_phi3 import build_phi3

    return build_phi3(tmp / "src")[0]


def gemma2(tmp: Path) -> Path:
    from test_gemma2 import build_gemma2

    return build_gemma2(tmp / "src")


def gemma3(tmp: Path) -> Path:
    from test_gemma3 import build_gemma3

    return build_gemma3(tmp / "src")


def olmo2(tmp: Path) -> Path:
    from test_olmo2 import build_olmo2

    return build_olmo2(tmp / "src")[0]


CHECKPOINTS = {
    "llama": lambda tmp: tc.build_llama(tmp / "src")[0],
    "qwen2": lambda tmp: tc.build_llama(tmp / "src", variant="qwen2")[0],
    "gpt_oss": lambda tmp: tc.build_gpt_oss(tmp / "src")[0],
    "qwen3": qwen3,
    "qwen3_moe": qwen3_moe,
    # Fused projections split per segment: GPT-2's c_attn (q|k|v), phi3's qkv_proj and gate_up_proj.
    "gpt2": lambda tmp: tc.build_gpt2(tmp / "src")[0],
    "phi3": phi3,
    "gemma2": gemma2,
    "gemma3": gemma3,
    # q_norm/k_norm over all heads: the sum of squares is all-summed (distributed/layers.py).
    "olmo2": olmo2,
    "llama_4bit": lambda tmp: quantized(tc.build_llama(tmp / "src")[0], tmp / "q4"),
    "gpt_oss_4bit": lambda tmp: quantized(tc.build_gpt_oss(tmp / "src")[0], tmp / "q4"),
}


def build_matrix(builders: dict[str, Any], tmp: Path) -> dict[str, Path]:
    """Each builder's checkpoint, in a folder of its own."""
    return {name: build(tmp / name) for name, build in builders.items()}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, list[dict[str, Any]]]]:
    """Every tiny checkpoint, and each one's results from one tensor-parallel job over them all."""
    tmp = tmp_path_factory.mktemp("tensor")
    checkpoints = build_matrix(CHECKPOINTS, tmp)
    out_dir = tmp / "out"
    out_dir.mkdir()
    return checkpoints, run_matrix(checkpoints, out_dir)


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def job(request: pytest.FixtureRequest, matrix) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(name, single-process results, each rank's results) for one tiny checkpoint."""
    checkpoints, ranks = matrix
    return request.param, single_process(checkpoints[request.param]), ranks[request.param]


def _close(name: str, key: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name} {key}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    if got.dtype.kind in "iub":
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {key}")
    else:
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=f"{name} {key}")


def _compare(name: str, got: dict[str, Any], want: dict[str, Any], prefix: str) -> int:
    keys = sorted(k for k in want if k.startswith(prefix))
    assert keys, f"nothing under {prefix!r}"
    assert sorted(k for k in got if k.startswith(prefix)) == keys, f"{name}: the sharded run has other {prefix} entries"
    for key in keys:
        if key.endswith(("/meta", "/tokens")):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
        else:
            _close(name, key, got[key], want[key])
    return len(keys)


def test_the_job_ran_on_two_ranks_each_holding_half_the_heads(job) -> None:
    name, single, ranks = job
    assert [r["world"].tolist() for r in ranks] == [[i, RANKS] for i in range(RANKS)]
    meta = json.loads(str(single["all_hooks/capture/layers.0.query/step0/0/meta"]))
    key_meta = json.loads(str(single["all_hooks/capture/layers.0.key/step0/0/meta"]))
    n_heads, n_kv = meta["shape"][0], key_meta["shape"][0]
    for r in ranks:
        assert r["local_heads"].tolist() == [n_heads // RANKS, n_kv // RANKS]
        classes = set(json.loads(str(r["layer_classes"])))
        sharded = {"QuantizedAllToShardedLinear", "QuantizedShardedToAllLinear"} if "4bit" in name else {"AllToShardedLinear", "ShardedToAllLinear"}
        assert sharded <= classes, classes
        if "gpt_oss" in name or "moe" in name:
            assert {"QuantizedShardedToAllSwitchLinear" if "4bit" in name else "ShardedToAllSwitchLinear"} <= classes, classes


def test_logits_and_greedy_tokens_equal_the_single_process_run(job) -> None:
    name, single, ranks = job
    got = ranks[0]
    np.testing.assert_array_equal(got["all_hooks/tokens"], single["all_hooks/tokens"])
    assert got["logits"].shape == (single["logits"].shape[0], single["logits"].shape[1])
    _close(name, "logits", got["logits"], single["logits"])
    _close(name, "logprobs", got["all_hooks/logprobs"], single["all_hooks/logprobs"])
    _close(name, "top_logprobs", got["all_hooks/top_logprobs"], single["all_hooks/top_logprobs"])


def test_every_capture_at_every_layer_equals_the_single_process_capture(job) -> None:
    name, single, ranks = job
    n = _compare(name, ranks[0], single, "all_hooks/capture/")
    components = {json.loads(str(single[k]))["component"] for k in single if k.startswith("all_hooks/capture/") and k.endswith("/meta")}
    sharded = {"query", "key", "value", "z", "attention_scores", "attention_pattern"}
    sharded |= {"expert_pre", "expert_post"} if "gpt_oss" in name or "moe" in name else {"mlp_pre", "mlp_post"}
    assert sharded <= components, sorted(sharded - components)
    assert n > 500


@pytest.mark.parametrize(
    "edit",
    ["z_ablate_first", "z_ablate_last", "residual_steer", "query_scale", "value_mean", "z_patch", "units_zero", "units_add", "units_topk"],
)
def test_an_intervention_gives_the_single_process_result(job, edit: str) -> None:
    name, single, ranks = job
    _compare(name, ranks[0], single, f"edit/{edit}/")
    plain = single["all_hooks/logprobs"]
    assert not np.allclose(single[f"edit/{edit}/logprobs"], plain, atol=1e-3), f"{edit} changed nothing: the check is vacuous"


def test_every_rank_is_handed_the_same_results(job) -> None:
    _, _, ranks = job
    first = ranks[0]
    for r, other in enumerate(ranks[1:], start=1):
        assert sorted(other) == sorted(first)
        for key in first:
            if key != "world":
                np.testing.assert_array_equal(other[key], first[key], err_msg=f"rank {r} {key}")
