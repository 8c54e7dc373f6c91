"""The benchmark harness's output is well formed, so it cannot rot unnoticed.

What is checked is structure, never speed: every figure in results.json is a finite number
of the unit its key names (a recursive walk, so a new figure is checked as soon as it
appears, and one whose key names no known unit fails until a rule is added to UNITS), every
contender ran without errors, and the report has all its sections. How fast anything is,
and whether a target is met, is the benchmarks' business (benchmarks/RESULTS.md).

One quick run (`python -m benchmarks --quick`, one tiny model; it writes into a temp dir
and the committed benchmarks/RESULTS.md and results.json must not change) is the only end
to end check of the harness. The report's sections a quick run does not reach (the
gpt-oss-20b shape, py-spy profiles, OpenBLAS) are rendered from the committed results.json
of the last full run.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.harness import BASE_CONTENDERS  # noqa: E402
from benchmarks.report import target_rows, write_report  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

COMMITTED = REPO / "benchmarks" / "RESULTS.md"
COMMITTED_JSON = REPO / "benchmarks" / "results.json"
KeyPath = tuple[Union[str, int], ...]

# ----------------------------------------------------------------------------- units by key name

STATS = {"median", "min", "max"}  # a figure's summary: the unit is the figure's own key's
COUNTS = {"n", "tokens", "rounds", "events", "samples", "captures", "steps", "rows_per_layer", "torch_threads",
          "wire_steps", "hidden_size", "intermediate_size", "vocab_size"}


def _positive(v: float) -> bool:
    return v > 0


def _positive_int(v: float) -> bool:
    return isinstance(v, int) and v > 0


def _whole_bytes(v: float) -> bool:
    return v > 0 and float(v).is_integer()


def _token_id(v: float) -> bool:
    return isinstance(v, int) and v >= 0


def _share(v: float) -> bool:
    return 0 <= v <= 1


def _non_negative(v: float) -> bool:
    return v >= 0


# (unit, does the key name it, is the value one). First match wins, so the rates ending in
# "_s" come before seconds. `in_list`: the number is an element of a list under that key.
UNITS: list[tuple[str, Callable[[str, bool], bool], Callable[[float], bool]]] = [
    ("GB/s", lambda k, _: k.endswith("gb_per_s"), _positive),
    ("MB/s", lambda k, _: k.endswith("mb_per_s"), _positive),
    ("GMAC/s", lambda k, _: k.endswith("(GMAC/s)"), _positive),
    ("GFLOP/s", lambda k, _: k.endswith("(GFLOP/s)"), _positive),
    ("tokens/s", lambda k, _: k.endswith("_tps"), _positive),
    ("bytes", lambda k, _: k.endswith("_bytes") or k == "bytes" or k.startswith("bytes_per_")
     or k.endswith("rss") or k.startswith("rss_"), _whole_bytes),
    ("seconds", lambda k, _: k.endswith("_s") or k in ("seconds", "ttft"), _positive),
    ("GiB", lambda k, _: k.endswith("_gib"), _positive),
    ("share of samples", lambda k, _: k.endswith("_share") or k in ("self", "inclusive"), _share),
    ("load average", lambda k, _: k.startswith("load_average"), _non_negative),
    ("token id", lambda k, in_list: in_list and k in ("first_tokens", "tokens"), _token_id),
    ("count", lambda k, in_list: not in_list and (k in COUNTS or k.endswith("_tokens") or k.startswith("num_")),
     _positive_int),
]
# Leaves that may be null: an architecture's absent field, OpenBLAS not found on the machine.
MAY_BE_NULL = {"num_local_experts", "num_experts_per_tok", "openblas"}


def leaves(x: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, path + (i,))
    else:
        yield path, x


def unit_key(path: KeyPath) -> tuple[str, bool]:
    """The key that names a leaf's unit (past list indices and median/min/max), and whether
    the leaf sits in a list under it."""
    keys = [p for p in path if isinstance(p, str)]
    while keys and keys[-1] in STATS:
        keys.pop()
    return (keys[-1] if keys else ""), bool(path) and isinstance(path[-1], int)


def bad_figures(results: dict[str, Any]) -> list[str]:
    """Every number leaf of results.json that is not finite, or not of the unit its key names."""
    bad = []
    for path, v in leaves(results):
        where = "/".join(map(str, path))
        if v is None:
            if path[-1] not in MAY_BE_NULL:
                bad.append(f"{where}: null")
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            bad.append(f"{where}: {v} is not finite")
            continue
        key, in_list = unit_key(path)
        rule = next(((unit, ok) for unit, names, ok in UNITS if names(key, in_list)), None)
        if rule is None:
            bad.append(f"{where}: no unit rule for key {key!r} (add one to UNITS in {Path(__file__).name})")
        elif not rule[1](v):
            bad.append(f"{where}: {v!r} is not a valid {rule[0]} figure")
    return bad


def test_the_unit_walk_catches_bad_figures() -> None:
    """The walk itself: finite, right unit, and unknown figures all reported."""
    sample = {
        "wire": {"one_step": {"json": {"mb_per_s": 3.5, "wire_bytes": 1024, "encode_s": 0.002}}},
        "models": {"m": {"contenders": {"ours": {"decode_tps": {"median": 10.0, "min": 9.0, "max": 11.0},
                                                 "first_tokens": [0, 17], "tokens": 6, "peak_rss": 2**20}}}},
        "config": {"num_local_experts": None},
    }
    assert bad_figures(sample) == []
    broken = json.loads(json.dumps(sample))
    broken["wire"]["one_step"]["json"]["mb_per_s"] = float("nan")
    broken["wire"]["one_step"]["json"]["wire_bytes"] = 10.5
    broken["models"]["m"]["contenders"]["ours"]["decode_tps"]["min"] = 0.0
    broken["models"]["m"]["contenders"]["ours"]["first_tokens"][1] = -1
    broken["models"]["m"]["contenders"]["ours"]["tokens"] = 6.0
    broken["models"]["m"]["contenders"]["ours"]["wobble"] = 1.0
    broken["models"]["m"]["contenders"]["ours"]["peak_rss"] = None
    found = "\n".join(bad_figures(broken))
    for where in ("mb_per_s: nan", "wire_bytes: 10.5", "decode_tps/min: 0.0", "first_tokens/1: -1",
                  "ours/tokens: 6.0", "no unit rule for key 'wobble'", "peak_rss: null"):
        assert where in found, (where, found)
    assert len(bad_figures(broken)) == 7


# ----------------------------------------------------------------------------- the report

SECTIONS = ("## Machine and versions", "## Targets", "## Decode and prefill", "## Wire formats",
            "## CPU kernels (MLX, this machine)", "## What the numbers mean", "## OpenBLAS on Linux (how to)")


def check_report(results: dict[str, Any], report: str) -> None:
    for heading in SECTIONS:
        assert heading in report, heading
    for key, model in results["models"].items():
        assert f"### {key}: {model['label']}" in report
        for label in model["contenders"]:
            assert f"| {label}: " in report, (key, label)
    # Every target row is in the table, the wire formats' "base64 >= 5x faster than json" among them.
    rows = target_rows(results)
    for part in ("one step", "all steps"):
        assert any(r[0].startswith(f"wire {part}: base64 >= 5.0x faster than json") for r in rows), rows
    for target, measured, verdict, _ in rows:
        assert f"| {target} | {measured} | {verdict} |" in report, target


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    before = (_digest(COMMITTED), _digest(COMMITTED_JSON))
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (_digest(COMMITTED), _digest(COMMITTED_JSON)) == before, "the quick run changed the committed results"
    return json.loads((out / "results.json").read_text()), (out / "RESULTS.md").read_text()


def test_quick_results_figures_are_finite_and_of_their_units(quick_run) -> None:
    results, _ = quick_run
    assert results["quick"] is True
    assert bad_figures(results) == []


def test_quick_run_every_contender_ran_without_errors(quick_run) -> None:
    results, _ = quick_run
    (model,) = results["models"].values()
    assert "server_pending" not in model, model.get("server_pending")
    contenders = model["contenders"]
    assert set(contenders) == {*BASE_CONTENDERS, "server"}
    for name, rec in contenders.items():
        assert not rec.get("error") and not rec["errors"], (name, rec.get("error"), rec["errors"])
        for figure in ("decode_tps", "prefill_tps", "ttft_s"):
            assert set(rec[figure]) == STATS, (name, figure)
            assert rec[figure]["min"] <= rec[figure]["median"] <= rec[figure]["max"], (name, figure)
        assert rec["rounds"] == results["settings"]["rounds"]
        assert rec["tokens"] == model["trial"]["decode_tokens"]
        assert rec["peak_rss"] > 50 * 2**20 and rec["load_s"] > 0
    # Same weights, same greedy tokens: the contenders run the same model.
    assert contenders["ours"]["first_tokens"] == contenders["mlx_lm"]["first_tokens"]
    assert contenders["ours"]["first_tokens"] == contenders["ours_residual"]["first_tokens"]

    wire = results["wire"]
    assert "pending" not in wire, wire.get("pending")
    for part in ("one_step", "all_steps"):
        assert set(wire[part]) == {"json", "base64", "safetensors"}
        assert wire[part]["base64"]["wire_bytes"] < wire[part]["json"]["wire_bytes"]
        assert {v["tensor_bytes"] for v in wire[part].values()} == {wire[part]["json"]["tensor_bytes"]}
    assert results["bandwidth"]["gb_per_s"] > 0
    assert results["kernels"]["reference BLAS"]["matvec float32 (GMAC/s)"] > 0


def test_quick_report_has_its_sections_and_every_figure(quick_run) -> None:
    results, report = quick_run
    check_report(results, report)
    assert "**Quick mode**" in report
    assert "python -m benchmarks --quick" in report
    assert results["versions"]["mlx"] in report
    # A quick run measures everything it reports: no placeholder stands in for a figure.
    for placeholder in (r"n/a", r"\bnan\b", r"\binf\b", r"failed:", r"\bpending\b", r"not measured"):
        assert not re.search(placeholder, report, re.IGNORECASE), placeholder


def test_the_committed_full_run_is_well_formed_and_renders(tmp_path: Path) -> None:
    """The last full run's results.json: its figures pass the same walk, and the report renders
    the sections only a full run reaches (gpt-oss-20b shape, profiles, OpenBLAS)."""
    before = _digest(COMMITTED)
    results = json.loads(COMMITTED_JSON.read_text())
    assert results["quick"] is False
    assert bad_figures(results) == []
    write_report(results, tmp_path / "RESULTS.md")
    report = (tmp_path / "RESULTS.md").read_text()
    check_report(results, report)
    if results.get("gpt_oss_20b"):
        assert "## gpt-oss-20b shape (synthetic, 4-bit)" in report
    if any(m.get("profiles") for m in results["models"].values()):
        assert "Profile (py-spy" in report
    for blas in results["kernels"]:
        assert f" {blas} |" in report, blas  # a column of the kernel table
    assert _digest(COMMITTED) == before
