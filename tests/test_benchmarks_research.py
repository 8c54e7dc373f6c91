"""The research benchmarks (extraction, store_analysis) run and report well-formed figures: structure, never speed.

Each runs in quick mode (a tiny model and corpus, every measurement in this process, the
2-rank job as two real processes) into a temporary folder. Every figure must be a positive
finite number in its unit (tokens/s, seconds, bytes), every contender must have run (no
error rows), and the reports, each run's own and the joined one, must render them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import extraction, research_report, store_analysis  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

UNITS = ("tokens_per_s", "seconds", "peak_rss_bytes", "rss_before_bytes", "store_bytes", "tokens")


def figures(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) of a unit-named key anywhere in the results."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in UNITS:
                out.append((f"{path}.{k}", v))
            out += figures(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += figures(v, f"{path}[{i}]")
    return out


def assert_well_formed(results: dict[str, Any]) -> None:
    found = figures(results)
    assert found
    for where, value in found:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert math.isfinite(value) and value > 0, (where, value)
        if where.endswith(("bytes", ".tokens")):
            assert float(value).is_integer(), (where, value)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("research")
    work = REPO / "benchmarks" / ".cache"  # the quick checkpoints, reused between runs (ignored by git)
    assert extraction.main(["--quick", "--out", str(out), "--work", str(work)]) == 0
    assert store_analysis.main(["--quick", "--out", str(out), "--work", str(work)]) == 0
    ext = json.loads(next(out.glob("extraction-*/results.json")).read_text())
    sto = json.loads(next(out.glob("store-analysis-*/results.json")).read_text())
    return ext, sto


def test_extraction_measures_every_contender(runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    ext, _ = runs
    rows = {r["label"]: r for r in ext["rows"]}
    assert [r for r in ext["rows"] if "error" in r] == []
    want = {"extract", "hooks off", "run_with_cache per window", *(f"{k} batch {b}" for k in ("transformers", "transformer_lens") for b in (1, 8))}
    assert set(rows) == want
    assert len({r["tokens"] for r in ext["rows"]}) == 1 and rows["extract"]["tokens"] == ext["settings"]["planned_tokens"]
    # the same weights: TransformerLens's residuals are transformers' hidden states
    for b in (1, 8):
        tl = rows[f"transformer_lens batch {b}"]
        assert tl["max_abs_diff_vs_transformers"] <= 1e-4 * tl["max_abs_residual"]
    big, small = ext["rss"]
    assert "error" not in big and "error" not in small and big["tokens"] > small["tokens"] and big["store_bytes"] > small["store_bytes"]
    ranks = ext["ranks"]
    assert "error" not in ranks and ranks["world_size"] == 2 and ranks["tokens"] == rows["extract"]["tokens"]
    assert sorted(r["rank"] for r in ranks["ranks"]) == [0, 1]
    assert_well_formed(ext)


def test_store_analysis_times_every_analysis(runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    _, sto = runs
    assert "error" not in sto["build"] and sto["build"]["width"] == sto["settings"]["width"]
    assert [r["kind"] for r in sto["rows"]] == list(store_analysis.ANALYSES)
    assert [r for r in sto["rows"] if "error" in r] == []
    pca = next(r for r in sto["rows"] if r["kind"] == "pca")
    assert pca["points"] == min(sto["settings"]["pca_points"], sto["build"]["tokens"])
    assert_well_formed(sto)


def test_reports_render_the_figures(runs: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    ext, sto = runs
    md, js = tmp_path / "RESULTS-research.md", tmp_path / "results-research.json"
    research_report.write_research(ext, sto, md, js)
    text = md.read_text()
    assert json.loads(js.read_text())["extraction"]["rows"] == ext["rows"]
    for row in ext["rows"]:
        assert f"| {row['label']} | {row['tokens']} | {research_report.num(row['tokens_per_s'])} |" in text
    for row in sto["rows"]:
        assert f"| {row['label']} | {research_report.num(row['seconds'], 2)} |" in text
    assert "## Peak memory against corpus size" in text and "## Two data-parallel ranks" in text and "## Machine" in text
    assert "failed" not in text and "Quick mode" in text


def test_the_committed_research_results_render() -> None:
    """benchmarks/results-research.json (the last full run) renders to the committed report."""
    committed = REPO / "benchmarks" / "results-research.json"
    if not committed.exists():
        pytest.skip("no full research run committed yet")
    r = json.loads(committed.read_text())
    assert not r["extraction"]["quick"] and not r["store_analysis"]["quick"]
    assert_well_formed(r["extraction"])  # failed rows carry an error and no figure
    assert_well_formed(r["store_analysis"])
    md = (REPO / "benchmarks" / "RESULTS-research.md").read_text()
    for row in r["extraction"]["rows"]:
        if "error" not in row:
            assert f"| {row['label']} | {row['tokens']} | {research_report.num(row['tokens_per_s'])} |" in md
