"""The distributed decode benchmark runs every cell and reports well-formed figures: structure, never speed.

`python -m benchmarks.distributed --quick` runs as a subprocess (a tiny model, 16 prompt
tokens, 8 steps; every cell a real job: one process, or two ranks on 127.0.0.1) into a
temporary folder. Every cell must have run, every figure must be a positive finite number
in its unit (tok/s, seconds, bytes), every cell's greedy tokens must equal the 1-rank
cell's, and the report must render the cells from results.json.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import distributed, distributed_report  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

RUN_TIMEOUT_S = 300
UNITS = ("tokens_per_s", "peak_rss_bytes", "rss_before_bytes", "capture_bytes")


def figures(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) of a figure anywhere in the results: a unit-named key or a `*_seconds` one."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in UNITS or k == "seconds" or k.endswith("_seconds"):
                out.append((f"{path}.{k}", v))
            out += figures(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += figures(v, f"{path}[{i}]")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("distributed")
    work = REPO / "benchmarks" / ".cache"  # the quick checkpoint, reused between runs (ignored by git)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--quick", "--out", str(out), "--work", str(work)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = next(out.glob("distributed-*"))
    return json.loads((folder / "results.json").read_text()), (folder / distributed_report.REPORT).read_text()


def test_every_cell_ran(run: tuple[dict[str, Any], str]) -> None:
    results, _ = run
    assert results["quick"] and results["benchmark"] == "distributed"
    assert [c for c in results["cells"] if "error" in c] == []
    want = {(m, h) for m, _, _ in distributed.MODES for h in distributed.HOOKS}
    assert {(c["mode"], c["hooks"]) for c in results["cells"]} == want and len(results["cells"]) == len(want)
    for c in results["cells"]:
        assert sorted(r["rank"] for r in c["ranks"]) == list(range(c["world"])), c["label"]
        assert all(r["world"] == c["world"] for r in c["ranks"]), c["label"]
        assert c["decode_steps"] == results["settings"]["decode_steps"]


def test_every_figure_is_positive_and_finite(run: tuple[dict[str, Any], str]) -> None:
    results, _ = run
    found = figures(results)
    wanted = {"tokens_per_s", "prefill_seconds", "decode_seconds", "load_seconds", "peak_rss_bytes"}
    assert wanted <= {where.rsplit(".", 1)[-1] for where, _ in found}
    for where, value in found:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert math.isfinite(value) and value > 0, (where, value)
        if where.endswith("bytes"):
            assert float(value).is_integer(), (where, value)
    for c in results["cells"]:
        assert all(r["peak_rss_bytes"] > 0 for r in c["ranks"]), c["label"]
    ratios = results["ratios"]
    for value in [*ratios["hooks_on_over_off"].values(), *(v for h in ratios["two_ranks_over_one"].values() for v in h.values())]:
        assert isinstance(value, float) and math.isfinite(value) and value > 0


def test_tokens_and_shapes_equal_across_cells(run: tuple[dict[str, Any], str]) -> None:
    results, _ = run
    cells = results["cells"]
    reference = cells[0]["token_ids"]
    assert len(reference) == results["settings"]["decode_steps"] + 1
    for c in cells:
        assert c["token_ids"] == reference, c["label"]
        assert all(r["token_ids"] == reference for r in c["ranks"]), c["label"]
        if c["world"] > 1:
            assert c["tokens_equal_1_rank"] is True, c["label"]
            assert c.get("shapes_equal_1_rank") is (True if c["hooks"] == "on" else None), c["label"]
    assert results["tokens_equal"] is True
    one_on = next(c for c in cells if c["mode"] == "1 rank" and c["hooks"] == "on")
    layers, pattern = results["settings"]["num_layers"], results["settings"]["pattern_layer"]
    assert set(one_on["shapes"]) == {f"layers.{i}.residual" for i in range(layers)} | {f"layers.{pattern}.attention_pattern"}
    heads = one_on["shapes"][f"layers.{pattern}.attention_pattern"]["last_decode"][0]
    assert heads == results["settings"]["heads"]  # every head, gathered back under tensor


def test_report_renders_every_cell(run: tuple[dict[str, Any], str]) -> None:
    results, text = run
    for c in results["cells"]:
        assert f"| {c['label']} | {c['world']} | {c['hooks']} | {distributed_report.num(c['tokens_per_s'])} |" in text
    assert "## The cost of the gathers" in text and "## Reading the numbers" in text and "## Machine" in text
    assert "no speed-up from 2 ranks is expected" in text and "ring backend" in text
    assert "failed" not in text and "Quick mode" in text and results["command"] in text
