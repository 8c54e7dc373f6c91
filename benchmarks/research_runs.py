"""What the research benchmarks (extraction, store_analysis) share: the corpus, one process per measurement.

Corpus: real text, the Python standard library's own source (the interpreter running the
benchmark; its `test` packages left out), cut into documents of `LINES_PER_DOCUMENT`
non-empty lines and written as JSON lines. Only as many documents as the largest
measurement needs are written; each extraction stops at its `max_tokens`.

Measurements: each one is a JSON task run by `python -m benchmarks.<module> --child TASK`
in a fresh process, so its peak resident set (VmHWM) is its own; the child prints one
`@@ {json}` line. Quick mode (the structure test) runs the tasks in the driver's process
instead: its figures then share one peak and say nothing about memory or speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .worker import memory_status

MARK = "@@ "
LINES_PER_DOCUMENT = 32
CHARS_PER_TOKEN = 6.0  # characters written per wanted token: more than the synthetic BPE's about 3.8


def stdlib_documents() -> list[str]:
    """The standard library's source files (no tests), each cut into documents of LINES_PER_DOCUMENT non-empty lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not ({"test", "tests", "site-packages", "idle_test"} & set(f.relative_to(root).parts)))
    docs = []
    for f in files:
        try:
            lines = [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, OSError):
            continue
        docs += ["\n".join(lines[i : i + LINES_PER_DOCUMENT]) for i in range(0, len(lines), LINES_PER_DOCUMENT)]
    return docs


def write_corpus(path: Path, tokens: int) -> dict[str, Any]:
    """Enough standard-library documents for `tokens` tokens as JSON lines; what was written."""
    docs, chars = [], 0
    for doc in stdlib_documents():
        if chars >= tokens * CHARS_PER_TOKEN:
            break
        docs.append(doc)
        chars += len(doc)
    if chars < tokens * CHARS_PER_TOKEN:
        raise RuntimeError(f"the standard library holds {chars:,} characters of source, too few for {tokens:,} tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return {"source": f"Python {sys.version.split()[0]} standard library source (no tests), {LINES_PER_DOCUMENT} lines per document",
            "documents": len(docs), "characters": chars, "bytes": path.stat().st_size}


def research_versions() -> dict[str, str]:
    """machine.versions and the libraries only these benchmarks use."""
    from importlib import metadata

    from .machine import versions

    out = versions()
    for dist in ("transformer-lens", "scikit-learn", "scipy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def timed_task(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measurement; its wall seconds and the process's memory with it."""
    before = memory_status()
    start = time.perf_counter()
    out = run()
    out.setdefault("seconds", time.perf_counter() - start)
    mem = memory_status()
    return {**out, "peak_rss_bytes": mem["peak_rss"], "rss_before_bytes": before["rss"]}


def spawn(module: str, task: dict[str, Any], timeout: float, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """`task` in a fresh `python -m benchmarks.<module> --child` process; its answer, or an error that says why."""
    proc = start(module, task, env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {**_label(task), "error": f"over {timeout:.0f} s"}
    return answer(task, proc.returncode, stdout, stderr)


def start(module: str, task: dict[str, Any], env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--child", json.dumps(task)]
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)


def answer(task: dict[str, Any], code: int, stdout: str, stderr: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    status = "killed by SIGKILL (on Linux usually the OOM killer: see dmesg)" if code == -9 else f"exit status {code}"
    return {**_label(task), "error": f"{status}; {(stderr or stdout)[-600:].strip()}"}


def _label(task: dict[str, Any]) -> dict[str, Any]:
    return {k: task[k] for k in ("kind", "batch", "label") if k in task}


def child_main(task_json: str, measure: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The child side: run the task, print its answer (an error is an answer too, with its reason)."""
    task = json.loads(task_json)
    try:
        result = measure(task)
    except Exception as exc:  # recorded by the driver, which goes on with the other measurements
        result = {**_label(task), "error": f"{type(exc).__name__}: {exc}"}
    print(MARK + json.dumps(result), flush=True)
    return 0


def run_task(module: str, task: dict[str, Any], measure: Callable[[dict[str, Any]], dict[str, Any]], in_process: bool,
             timeout: float) -> dict[str, Any]:
    """A measurement in a fresh process (the full run), or here (quick mode)."""
    if not in_process:
        return spawn(module, task, timeout)
    try:
        return measure(task)
    except Exception as exc:
        return {**_label(task), "error": f"{type(exc).__name__}: {exc}"}
