"""Data-parallel extraction: a 2-rank ring job on 127.0.0.1 writes the store a single process writes.

Each rank is the real command line (`python -m mlx_engine.cli extract ...`) started with
MLX_RANK and MLX_HOSTFILE (a JSON list of "127.0.0.1:port", ports found free by binding
port 0), so no launcher is involved. Every wait is bounded: a job that overruns is killed.

Equality with the one-process store (tests/test_store_resume.py's corpus and settings):
- rows, tokens, (doc, pos), documents, counts, extrema, fraction active and the top-k:
  identical (the ranks run the one-process batches, so every row is bit-identical, and the
  top-k tie rule is global);
- mean, variance, skewness, kurtosis, participation ratio: relative 1e-9 (float64 moments
  merged across ranks in another order than folded batch by batch: rounding only).
A job killed with SIGKILL after both ranks committed a shard resumes, with the same
command, to the same store; a folder rank 0 refuses stops rank 1 with an error too; a rank
left alone by a killed or frozen peer exits 1 (the ring's error, or after --rank-timeout)
instead of waiting forever, and the job resumes from what both ranks committed. The timeout wrapper itself (CollectiveBound)
is tested without processes: a wait that never returns, and waits that do.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import mlx_engine  # noqa: F401, I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
from test_store_resume import api_hooks, command, corpus_lines

from mlx_engine.cli import main
from mlx_engine.store.errors import StoreError
from mlx_engine.store.ranks import AFTER_LOSS, RANK_LOST_EXIT, CollectiveBound, RankGroup
from mlx_engine.store.reader import ActivationStore

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

RANKS = 2
JOB_TIMEOUT_S = 90
MOMENT_RTOL = 1e-9
# Small shards: each rank commits several, and chunks of ceil(300 / (4 * 24)) = 4 batches alternate between ranks.
OPTIONS = dict(context_size=24, batch_size=4, shard_tokens=300, top_k=6)
CLI_OPTIONS = ["--context-size", "24", "--batch-size", "4", "--shard-tokens", "300", "--top-k", "6"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ranks") / "lines.txt"
    path.write_text("\n".join(corpus_lines()[:160]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(llama_kit, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    out = tmp_path_factory.mktemp("one_rank") / "store"
    return mlx_engine.extract(llama_kit, corpus, api_hooks(), out, progress=False, **OPTIONS)


def free_ports(n: int) -> list[int]:
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


def rank_command(checkpoint: Path, corpus: Path, out: Path) -> list[str]:
    args = command(checkpoint, corpus, out)
    at = args.index("--context-size")
    return [sys.executable, "-m", "mlx_engine.cli", *args[:at], *CLI_OPTIONS, "--no-progress"]


def start_ranks(checkpoint: Path, corpus: Path, out: Path, logs: Path,
                extra: Optional[dict[int, list[str]]] = None) -> list[subprocess.Popen]:
    """Every rank's process; `extra`: more command-line arguments for some ranks."""
    hostfile = logs / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(RANKS)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return [
        subprocess.Popen([*rank_command(checkpoint, corpus, out), *(extra or {}).get(r, [])], env={**env, "MLX_RANK": str(r)},
                         stdout=open(logs / f"rank{r}.log", "w"), stderr=subprocess.STDOUT)
        for r in range(RANKS)
    ]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def wait_ranks(procs: list[subprocess.Popen], logs: Path, expect: int = 0) -> None:
    codes: Optional[list[int]] = None
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(procs)
    if codes is None or any(c != expect for c in codes):
        pytest.fail(f"2-rank extraction {'timed out' if codes is None else f'exited {codes}'}:\n{log_tails(logs)}")


def log_tails(logs: Path) -> str:
    return "\n".join(f"--- rank {r} ---\n{(logs / f'rank{r}.log').read_text()[-3000:]}" for r in range(RANKS))


def assert_same_store(got: ActivationStore, expected: ActivationStore) -> None:
    assert got.complete and got.num_tokens == expected.num_tokens > 0
    assert np.array_equal(np.asarray(got.tokens()), np.asarray(expected.tokens()))
    for a, b in zip(got.index(), expected.index()):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert list(got.documents()) == list(expected.documents())
    for hook in expected.hooks:
        assert np.array_equal(np.asarray(got.rows(hook)), np.asarray(expected.rows(hook))), hook
        s, e = got.stats(hook), expected.stats(hook)
        assert s.count == e.count
        for field in ("minimum", "maximum", "above", "top_values", "top_doc", "top_pos"):
            assert np.array_equal(getattr(s, field), getattr(e, field)), (hook, field)
        for name in ("mean", "variance", "skewness", "kurtosis", "participation_ratio"):
            np.testing.assert_allclose(getattr(s, name), getattr(e, name), rtol=MOMENT_RTOL, atol=1e-12, err_msg=f"{hook} {name}")
    got_rows, expected_rows = (list(csv.DictReader((s.path / "sparsity.csv").read_text().splitlines())) for s in (got, expected))
    assert [list(r) for r in got_rows] == [list(r) for r in expected_rows] and len(got_rows) == len(expected.hooks)
    for g, e in zip(got_rows, expected_rows):
        for key in g:
            try:
                np.testing.assert_allclose(float(g[key]), float(e[key]), rtol=MOMENT_RTOL, err_msg=key)
            except ValueError:  # hook id, component
                assert g[key] == e[key]


def test_two_ranks_equal_one_rank(llama_checkpoint: Path, corpus: Path, reference: ActivationStore, tmp_path: Path) -> None:
    out = tmp_path / "store"
    wait_ranks(start_ranks(llama_checkpoint, corpus, out, tmp_path), tmp_path)
    store = ActivationStore.open(out)
    assert store.manifest["world_size"] == RANKS
    ranks = {s["rank"] for s in store.manifest["shards"]}
    assert ranks == {0, 1}, "both ranks wrote shards"
    firsts = [tuple(s["first"]) for s in store.manifest["shards"]]
    assert firsts == sorted(firsts), "the merged manifest lists the shards in corpus order"
    assert_same_store(store, reference)


def committed(out: Path, rank: int) -> int:
    try:
        return len(json.loads((out / "ranks" / f"rank{rank:04d}.json").read_text())["shards"])
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def test_killed_ranks_resume(llama_checkpoint: Path, corpus: Path, reference: ActivationStore, tmp_path: Path) -> None:
    out = tmp_path / "store"
    procs = start_ranks(llama_checkpoint, corpus, out, tmp_path)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not all(committed(out, r) for r in range(RANKS)):
            if any(p.poll() is not None for p in procs):
                pytest.fail("a rank ended before it was killed: the corpus is too small to interrupt")
            assert time.monotonic() < deadline, "no rank committed a shard in time"
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        stop(procs)
    assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"
    assert ActivationStore.open(out).num_tokens == 0  # the ranks' shards are merged only when the job ends
    wait_ranks(start_ranks(llama_checkpoint, corpus, out, tmp_path), tmp_path)
    store = ActivationStore.open(out)
    assert max(m["timings"]["runs"] for m in store.manifest["ranks"]) >= 2, "the second job resumed"
    assert_same_store(store, reference)


def test_a_refusal_on_rank_0_stops_every_rank(llama_checkpoint: Path, corpus: Path, reference: ActivationStore, tmp_path: Path) -> None:
    """Rank 0 alone judges the folder (here: a one-process store, other settings); rank 1 must
    get an error too, not wait forever in the next collective. Nothing in the folder changes."""
    out = tmp_path / "store"
    shutil.copytree(reference.path, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    wait_ranks(start_ranks(llama_checkpoint, corpus, out, tmp_path), tmp_path, expect=2)
    assert "other settings (differing: rank_chunk_batches, world_size)" in (tmp_path / "rank0.log").read_text()
    assert "Rank 0 of the data-parallel job refused the store folder" in (tmp_path / "rank1.log").read_text()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_rank_ends_the_rank_waiting_for_it(llama_checkpoint: Path, corpus: Path, reference: ActivationStore,
                                                  tmp_path: Path, stop_signal: signal.Signals) -> None:
    """Rank 1 stops after its first commit; rank 0 ends its own batches, then needs rank 1 in the
    next collective. Killed (SIGKILL), rank 1's sockets close: the ring fails that collective, or,
    had its socket thread given up first, the collective would wait forever and the watchdog ends
    it. Frozen (SIGSTOP: a machine gone without closing its sockets), the collective never
    returns: only the watchdog ends it, after --rank-timeout. Either way rank 0 exits 1 promptly
    with a message naming the step; what both ranks committed is kept, and the same command on
    both ranks resumes to the one-process store."""
    out = tmp_path / "store"
    procs = start_ranks(llama_checkpoint, corpus, out, tmp_path, extra={0: ["--rank-timeout", "5"]})
    code: Optional[int] = None
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not committed(out, 1):
            if any(p.poll() is not None for p in procs):
                pytest.fail(f"a rank ended before rank 1 was killed:\n{log_tails(tmp_path)}")
            assert time.monotonic() < deadline, "rank 1 committed no shard in time"
            time.sleep(0.02)
        procs[1].send_signal(stop_signal)
        killed = time.monotonic()
        try:
            code = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waits 60 s after rank 1 was killed:\n{log_tails(tmp_path)}")
        assert time.monotonic() - killed < 60
    finally:
        stop(procs)
    log = (tmp_path / "rank0.log").read_text()
    assert code == RANK_LOST_EXIT, log[-3000:]
    waited = "error: rank 0 waited 5 s for the other ranks at 'extracting its batches': " + AFTER_LOSS
    failed = "error: rank 0 lost the other ranks at 'extracting its batches' ("
    assert waited in log or (stop_signal == signal.SIGKILL and failed in log and AFTER_LOSS in log), log[-3000:]
    store = ActivationStore.open(out)
    assert store.manifest["status"] == "incomplete" and store.num_tokens == 0  # merged only when the job ends
    for r in range(RANKS):
        record = json.loads((out / "ranks" / f"rank{r:04d}.json").read_text())
        assert record["shards"] and all((out / s["file"]).is_file() for s in record["shards"]), r
    wait_ranks(start_ranks(llama_checkpoint, corpus, out, tmp_path), tmp_path)
    store = ActivationStore.open(out)
    assert max(m["timings"]["runs"] for m in store.manifest["ranks"]) >= 2, "the second job resumed"
    assert_same_store(store, reference)


def test_a_collective_that_never_returns_ends_the_rank(capsys: pytest.CaptureFixture[str]) -> None:
    """The watchdog's report comes from its own thread while the waiting one stays stuck: settle
    first (the writer's commit done), then the message on stderr, then the exit."""
    exits: "queue.Queue[int]" = queue.Queue()
    settled = threading.Event()
    bound = CollectiveBound(3, 0.2, settle=settled.set, exit=exits.put)
    try:
        with bound.waiting("gathering the records and statistics"):
            code = exits.get(timeout=30)  # a collective stuck until the process ends
    finally:
        bound.close()
    assert code == RANK_LOST_EXIT and settled.is_set()
    err = capsys.readouterr().err
    assert f"error: rank 3 waited 0.2 s for the other ranks at 'gathering the records and statistics': {AFTER_LOSS}" in err


def test_collectives_that_return_never_end_the_rank() -> None:
    """Only the time inside a collective counts: the work between two (a rank's batches) is not a wait."""
    exits: "queue.Queue[int]" = queue.Queue()
    bound = CollectiveBound(0, 0.2, exit=exits.put)
    try:
        for what in ("checking the input", "extracting its batches"):
            with bound.waiting(what):
                pass
            time.sleep(0.5)  # longer than the timeout, outside any collective
    finally:
        bound.close()
    assert exits.empty()


def test_one_rank_is_not_bounded_and_bad_timeouts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert RankGroup(None, 0, 1).bounded(5.0).bound is None
    for bad in (0, -1.0, float("nan"), float("inf"), "600", True):
        with pytest.raises(StoreError, match="rank_timeout_s must be a positive number of seconds"):
            mlx_engine.extract("no-model-needed", ["text"], ["layers.0.residual"], tmp_path / "store", rank_timeout_s=bad)
    assert not (tmp_path / "store").exists()
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--data", "x.txt", "--hooks", "layers.0.residual", "--out", str(tmp_path / "store"), "--rank-timeout", "0"])
    assert exc.value.code == 2 and "not a positive number of seconds: 0" in capsys.readouterr().err
