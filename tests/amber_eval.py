"""Evaluate a Smalltalk expression in Amber on Node after filing sources in (run-sunit.js --eval)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from test_smalltalk_amber import RUNNER, amber_node


def amber_eval(sources: list[Path], expression: str, timeout: float = 300) -> tuple[int, dict[str, Any], str]:
    """The runner's exit status, its JSON summary (the answer under "value", or "error") and its output."""
    command = [amber_node(), str(RUNNER), "--timeout-ms", str(int(timeout * 1000))]
    for source in sources:
        command += ["--source", str(source)]
    done = subprocess.run(command + ["--eval", expression], capture_output=True, text=True, timeout=timeout + 30)
    output = done.stdout + done.stderr
    summary = json.loads(done.stdout.splitlines()[0]) if done.stdout.strip() else {}
    return done.returncode, summary, output[-3000:]
