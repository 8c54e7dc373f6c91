"""No loss: a killed extraction resumes to exactly the uninterrupted store; bad input leaves nothing behind.

The CLI runs in a subprocess that is killed with SIGKILL (or interrupted with SIGINT)
once its first shard is committed; the same command then resumes it. A disk that
fills up is a real write error: the subprocess runs under RLIMIT_FSIZE, so writing a
shard fails with EFBIG as it would with ENOSPC.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx_engine  # noqa: F401  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest

from mlx_engine.cli import main
from mlx_engine.hooks.names import HookSpecError
from mlx_engine.store.errors import CorpusError, StoreError, StoreMismatchError
from mlx_engine.store.reader import ActivationStore
from mlx_engine.store.stats import STATE_FIELDS

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

HOOKS = ["layers.1.residual", '{"layer_name": 2, "component": "mlp_post", "indices": [3, 9, 1]}']
OPTIONS = ["--context-size", "24", "--batch-size", "4", "--shard-tokens", "1500", "--top-k", "6"]


def corpus_lines() -> list[str]:
    """Real text: the json package's source, one line per document (a few hundred documents)."""
    import json.decoder
    import json.encoder
    import inspect

    text = "\n".join(inspect.getsource(m) for m in (json, json.decoder, json.encoder))
    return [line for line in text.splitlines() if line.strip()][:400]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "lines.txt"
    path.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    return path


def command(checkpoint: Path, corpus: Path, out: Path) -> list[str]:
    return ["extract", "--model", str(checkpoint), "--data", str(corpus), "--hooks", *HOOKS, "--out", str(out), *OPTIONS, "--no-progress"]


def api_hooks() -> list:
    return [h if not h.startswith("{") else json.loads(h) for h in HOOKS]


@pytest.fixture(scope="module")
def reference(llama_kit, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    """The same extraction, uninterrupted, through the Python API."""
    out = tmp_path_factory.mktemp("reference") / "store"
    return mlx_engine.extract(llama_kit, corpus, api_hooks(), out, context_size=24, batch_size=4, shard_tokens=1500, top_k=6, progress=False)


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-m", "mlx_engine.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def committed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


def stop_after_first_shard(proc: subprocess.Popen, out: Path, sig: int) -> None:
    deadline = time.monotonic() + 120
    while committed_shards(out) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard was committed in time"
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=60)


def assert_same_store(got: ActivationStore, want: ActivationStore) -> None:
    assert got.complete and got.num_tokens == want.num_tokens
    assert [s["rows"] for s in got.manifest["shards"]] == [s["rows"] for s in want.manifest["shards"]]
    assert np.array_equal(np.asarray(got.tokens()), np.asarray(want.tokens()))
    for a, b in zip(got.index(), want.index()):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for hook in want.hooks:
        assert np.array_equal(np.asarray(got.rows(hook)), np.asarray(want.rows(hook))), hook
        s, t = got.stats(hook), want.stats(hook)
        for name in STATE_FIELDS:
            assert np.array_equal(getattr(s, name), getattr(t, name)), (hook, name)
    assert (got.path / "documents.jsonl").read_bytes() == (want.path / "documents.jsonl").read_bytes()
    assert (got.path / "sparsity.csv").read_bytes() == (want.path / "sparsity.csv").read_bytes()
    assert not list(got.path.rglob("*.tmp"))


def test_a_run_killed_after_its_first_shard_resumes_to_the_same_store(llama_checkpoint: Path, corpus: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = spawn(command(llama_checkpoint, corpus, out))
    stop_after_first_shard(proc, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    killed = ActivationStore.open(out)  # a killed store opens and shows what was committed
    assert not killed.complete and 1 <= len(killed.manifest["shards"]) < len(reference.manifest["shards"])
    assert np.array_equal(np.asarray(killed.rows("layers.1.residual")), np.asarray(reference.rows("layers.1.residual"))[: killed.num_tokens])
    done = spawn(command(llama_checkpoint, corpus, out))
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr
    assert_same_store(ActivationStore.open(out), reference)
    assert ActivationStore.open(out).manifest["timings"]["runs"] == 2


def interruptible() -> None:
    """For the child: Ctrl-C raises KeyboardInterrupt, as in a terminal.

    A suite started as a background job of a non-interactive shell (as CI scripts often are)
    runs with SIGINT ignored, and an ignored signal stays ignored across exec, so without this
    the child would never see the interrupt and would finish the whole store.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupt_stops_cleanly_and_resumes(llama_checkpoint: Path, llama_kit, corpus: Path, tmp_path: Path) -> None:
    # Small shards (300 rows, about 34 of them): the interrupt comes after the first commit with
    # nearly all the work still ahead, so a fast machine cannot finish before the signal lands.
    small = [*OPTIONS[:-3], "300", *OPTIONS[-2:]]
    reference = mlx_engine.extract(llama_kit, corpus, api_hooks(), tmp_path / "reference", context_size=24, batch_size=4,
                                   shard_tokens=300, top_k=6, progress=False)
    out = tmp_path / "interrupted"
    argv = [*command(llama_checkpoint, corpus, out)[:-len(OPTIONS) - 1], *small, "--no-progress"]
    proc = spawn(argv, preexec_fn=interruptible)
    stop_after_first_shard(proc, out, signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130 and "re-run the same command to resume" in stderr, stderr
    assert not ActivationStore.open(out).complete and not list(out.rglob("*.tmp"))
    assert main(argv) == 0
    assert_same_store(ActivationStore.open(out), reference)


def limit_file_size(limit: int):
    """For the child: files may not grow past `limit` bytes, and writing past it fails (EFBIG) instead of killing."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_stops_with_a_clear_error_and_a_store_that_opens(llama_checkpoint: Path, corpus: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "full"
    proc = spawn(command(llama_checkpoint, corpus, out), preexec_fn=limit_file_size(1 << 10))  # not even a manifest fits
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Cannot create the activation store" in stderr and "File too large" in stderr, stderr
    assert not out.exists()
    proc = spawn(command(llama_checkpoint, corpus, out), preexec_fn=limit_file_size(64 << 10))  # the first shard does not fit
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "Writing the activation store" in stderr and "File too large" in stderr and "re-run the same command" in stderr
    store = ActivationStore.open(out)  # opens, with what was committed before the failure (here: nothing)
    assert not store.complete and store.num_tokens == 0 and not list(out.rglob("*.tmp"))
    assert not list((out / "shards").iterdir())
    assert main(command(llama_checkpoint, corpus, out)) == 0  # space again: the same command finishes the store
    assert_same_store(ActivationStore.open(out), reference)


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_inputs_are_refused_before_anything_is_written(llama_kit, corpus: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "never"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine line"}\n{"content": "no text field"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [
        (tmp_path / "missing.txt", ["layers.1.residual"], CorpusError, "not found"),
        (bad, ["layers.1.residual"], CorpusError, r"bad\.jsonl:2: no 'text' field"),
        (corpus, ["layers.9.residual"], HookSpecError, "out of range"),
        (corpus, ["layers.1.no_such_component"], HookSpecError, "Unknown component"),
        (empty, ["layers.1.residual"], CorpusError, "no non-empty documents"),
    ]
    for data, hooks, error, message in cases:
        with pytest.raises(error, match=message):
            mlx_engine.extract(llama_kit, data, hooks, out, progress=False)
        assert not out.exists(), message
    before = listing(reference.path)
    with pytest.raises(StoreMismatchError, match=r"other settings \(differing: context_size\)"):
        mlx_engine.extract(llama_kit, corpus, api_hooks(), reference.path, context_size=32, batch_size=4, shard_tokens=1500, top_k=6, progress=False)
    assert listing(reference.path) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no activation store"):
        mlx_engine.extract(llama_kit, corpus, ["layers.1.residual"], other, progress=False)
    assert listing(other) == {"notes.txt": b"mine"}


def test_the_command_line_reports_bad_input(llama_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    rc = main(["extract", "--model", str(llama_checkpoint), "--data", str(bad), "--hooks", "layers.0.residual", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "error: " in capsys.readouterr().err and not (tmp_path / "o").exists()
