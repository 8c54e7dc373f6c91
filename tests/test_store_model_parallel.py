"""Model-parallel extraction: `extract --parallel tensor|pipeline` on 2 ranks writes the one-process store.

Each rank is the real command line (`python -m mlx_engine.cli extract --parallel ...`)
started with MLX_RANK and MLX_HOSTFILE (ring backend over 127.0.0.1); every wait is bounded.
The hooks cover the three kinds of site a split model has: a residual (whole on every
rank), a neuron subset of an MLP's hidden units (split over the ranks under tensor
parallelism, gathered before the subset is taken), and every head's `z` (split by head);
under the pipeline (blocks 0-1 on rank 0, block 2 on rank 1) the MLP site lives on rank 1
and reaches the store through rank 0.

Against the one-process store of the same command:
- tokens, (doc, pos), documents, counts and the shard layout: identical;
- pipeline rows: bit-identical (every block runs the one-process ops on one rank);
- tensor-parallel rows: within 1e-5 absolute + 1e-5 relative (each rank's partial matmul
  is summed across ranks, so float32 rounding differs), and the statistics within the same
  tolerance; rounding may swap near-ties in a top-k, so each top-k entry is checked to hold
  its value in the one-process rows, and at most 5% of the entries may name another position.
A killed or frozen follower ends rank 0 (at once on the ring's error, or after its
--rank-timeout) with its committed shards intact, and the same command resumes; ranks started with different settings are refused before
the folder is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import mlx_engine  # noqa: F401, I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
from test_store_ranks import free_ports, log_tails, stop, wait_ranks

from mlx_engine.store.ranks import AFTER_LOSS, RANK_LOST_EXIT
from mlx_engine.store.reader import ActivationStore

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

RANKS = 2
JOB_TIMEOUT_S = 120  # a lost follower: rank 0's own bound, then the resumed job
ATOL = RTOL = 1e-5
HOOKS = ["layers.1.residual", '{"layer_name": 2, "component": "mlp_post", "indices": [3, 100, 9, 64]}',
         '{"layer_name": 0, "component": "z"}']
OPTIONS = dict(context_size=24, batch_size=4, shard_tokens=400, top_k=6)
CLI_OPTIONS = ["--context-size", "24", "--batch-size", "4", "--shard-tokens", "400", "--top-k", "6"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_store_resume import corpus_lines

    path = tmp_path_factory.mktemp("model_parallel") / "lines.txt"
    path.write_text("\n".join(corpus_lines()[:120]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(llama_kit, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    out = tmp_path_factory.mktemp("one_process") / "store"
    hooks = [h if not h.startswith("{") else json.loads(h) for h in HOOKS]
    return mlx_engine.extract(llama_kit, corpus, hooks, out, progress=False, **OPTIONS)


def start_ranks(checkpoint: Path, corpus: Path, out: Path, logs: Path, mode: str,
                extra: Optional[dict[int, list[str]]] = None) -> list[subprocess.Popen]:
    hostfile = logs / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(RANKS)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "mlx_engine.cli", "extract", "--model", str(checkpoint), "--data", str(corpus),
            "--hooks", *HOOKS, "--out", str(out), *CLI_OPTIONS, "--parallel", mode, "--no-progress"]
    return [subprocess.Popen([*args, *(extra or {}).get(r, [])], env={**env, "MLX_RANK": str(r)},
                             stdout=open(logs / f"rank{r}.log", "w"), stderr=subprocess.STDOUT) for r in range(RANKS)]


def assert_equal_store(got: ActivationStore, expected: ActivationStore, exact: bool) -> None:
    assert got.complete and got.num_tokens == expected.num_tokens > 0
    assert got.manifest["world_size"] == 1, "one writer: rank 0"
    assert [s["rows"] for s in got.manifest["shards"]] == [s["rows"] for s in expected.manifest["shards"]]
    assert np.array_equal(np.asarray(got.tokens()), np.asarray(expected.tokens()))
    for a, b in zip(got.index(), expected.index()):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert list(got.documents()) == list(expected.documents())
    assert got.hooks == expected.hooks
    for hook in expected.hooks:
        rows, want = np.asarray(got.rows(hook)), np.asarray(expected.rows(hook))
        assert rows.shape == want.shape, hook
        if exact:
            assert np.array_equal(rows, want), hook
        else:
            np.testing.assert_allclose(rows, want, atol=ATOL, rtol=RTOL, err_msg=hook)
        s, e = got.stats(hook), expected.stats(hook)
        assert s.count == e.count
        for name in ("mean", "variance", "minimum", "maximum", "top_values"):
            np.testing.assert_allclose(getattr(s, name), getattr(e, name), atol=ATOL, rtol=RTOL, err_msg=f"{hook} {name}")
        if exact:
            assert np.array_equal(s.top_doc, e.top_doc) and np.array_equal(s.top_pos, e.top_pos), hook
        else:
            assert_top_examples_hold(s, want, expected, hook)


def assert_top_examples_hold(got, want: np.ndarray, expected: ActivationStore, hook: str) -> None:
    """Rounding may reorder near-ties, so a top-k entry may name another (doc, pos) than the
    one-process run's; each must still hold its value in the one-process rows (within the tolerance)."""
    doc, pos = (np.asarray(a) for a in expected.index())
    row_of = {(int(d), int(p)): i for i, (d, p) in enumerate(zip(doc, pos))}
    moved = 0
    e = expected.stats(hook)
    for k, neuron in np.ndindex(*got.top_values.shape):  # [k, width]
        if not np.isfinite(got.top_values[k, neuron]):
            continue
        where = (int(got.top_doc[k, neuron]), int(got.top_pos[k, neuron]))
        np.testing.assert_allclose(want[row_of[where], neuron], got.top_values[k, neuron], atol=ATOL, rtol=RTOL,
                                   err_msg=f"{hook} neuron {neuron} top {k}")
        moved += where != (int(e.top_doc[k, neuron]), int(e.top_pos[k, neuron]))
    assert moved <= got.top_values.size // 20, f"{hook}: {moved} top-k entries moved, more than near-ties explain"


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_two_ranks_write_the_one_process_store(llama_checkpoint: Path, corpus: Path, reference: ActivationStore,
                                               tmp_path: Path, mode: str) -> None:
    out = tmp_path / "store"
    wait_ranks(start_ranks(llama_checkpoint, corpus, out, tmp_path, mode), tmp_path)
    store = ActivationStore.open(out)
    assert store.manifest["settings"]["model_parallel"] == {"mode": mode, "world_size": RANKS}
    assert_equal_store(store, reference, exact=mode == "pipeline")
    assert "rank 0 wrote the store" not in (tmp_path / "rank1.log").read_text(), "the folder is shared: rank 1 sees it"


def committed(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_follower_ends_rank_0_and_the_job_resumes(llama_checkpoint: Path, corpus: Path, reference: ActivationStore,
                                                        tmp_path: Path, stop_signal: signal.Signals) -> None:
    """Rank 1 stops once rank 0 has committed a shard. Killed, its sockets close and the ring
    fails rank 0's transfer; frozen (SIGSTOP: a machine gone without closing its sockets),
    rank 0 waits inside a forward pass or an agreement until its --rank-timeout. Either way
    rank 0 exits 1 with its shards intact, and the same command on both ranks then completes
    the store."""
    out = tmp_path / "store"
    procs = start_ranks(llama_checkpoint, corpus, out, tmp_path, "tensor", extra={0: ["--rank-timeout", "5"]})
    code: Optional[int] = None
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not committed(out):
            if any(p.poll() is not None for p in procs):
                pytest.fail(f"a rank ended before rank 1 was killed:\n{log_tails(tmp_path)}")
            assert time.monotonic() < deadline, "rank 0 committed no shard in time"
            time.sleep(0.02)
        procs[1].send_signal(stop_signal)
        try:
            code = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still runs 60 s after rank 1 was killed:\n{log_tails(tmp_path)}")
    finally:
        stop(procs)
    log = (tmp_path / "rank0.log").read_text()
    assert code == RANK_LOST_EXIT, log[-3000:]
    lost = "error: rank 0 lost the other ranks at "
    waited = "error: rank 0 waited 5 s for the other ranks at "
    assert AFTER_LOSS in log and (waited in log or (stop_signal == signal.SIGKILL and lost in log)), log[-3000:]
    partial = ActivationStore.open(out)
    assert partial.manifest["status"] == "incomplete" and 0 < partial.num_tokens < reference.num_tokens
    again = tmp_path / "resumed"
    again.mkdir()
    wait_ranks(start_ranks(llama_checkpoint, corpus, out, again, "tensor"), again)
    store = ActivationStore.open(out)
    assert store.manifest["timings"]["runs"] == 2, "the second job resumed"
    assert_equal_store(store, reference, exact=False)


def test_ranks_with_different_settings_are_refused(llama_checkpoint: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    wait_ranks(start_ranks(llama_checkpoint, corpus, out, tmp_path, "pipeline", extra={1: ["--top-k", "7"]}), tmp_path, expect=2)
    for r in range(RANKS):
        assert "differ in checkpoint, corpus, hooks or options" in (tmp_path / f"rank{r}.log").read_text(), log_tails(tmp_path)
    assert not out.exists(), "refused before the folder was touched"
