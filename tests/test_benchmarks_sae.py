"""The SAE benchmarks run end to end and report well-formed figures (structure, never speed).

One quick run (`python -m benchmarks.sae_training --quick`, into a temp dir) trains a TopK SAE
with our trainer and with SAELens's on the same batches of a tiny store, and streams an SAE's
features during decode; every figure must be a finite number of the unit its key names, both
trainers and the decode trial must have succeeded, and the report must render its sections.
`heldout_metrics`, the numpy function both SAEs are judged by, is checked against our MLX
`reconstruction_metrics` (an independent implementation) on an SAE with non-unit decoder rows.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Union

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import sae_training  # noqa: E402
from benchmarks.sae_trainers import heldout_metrics  # noqa: E402

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens: the test extra)")

KeyPath = tuple[Union[str, int], ...]
POSITIVE = ("tokens_per_s", "seconds", "median", "min", "max", "tps", "_s")
COUNTS = {"rows", "train_tokens", "n_rows", "n_train", "documents", "d_in", "d_model", "d_sae", "k", "captures",
          "prompt_tokens", "decode_tokens", "rounds", "norm_rows_count", "torch_threads"}


def _figures(obj: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _figures(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _figures(v, (*path, i))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _unit_ok(path: KeyPath, value: float, k: int) -> bool:
    key = next(p for p in reversed(path) if isinstance(p, str))
    if not math.isfinite(value):
        return False
    if key == "fve":
        return value <= 1.0
    if key == "l0":
        return 0 < value <= k
    if key == "dead_fraction_training":
        return 0 <= value <= 1
    if key in ("peak_rss_bytes",) or key in COUNTS:
        return isinstance(value, int) and value > 0
    if key == "layer":
        return isinstance(value, int) and value >= 0
    if key.endswith(POSITIVE) or key in ("all",):
        return value > 0
    raise AssertionError(f"{'.'.join(map(str, path))}: no unit rule for this figure's key")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sae-bench")
    cmd = [sys.executable, "-m", "benchmarks.sae_training", "--quick", "--work", str(root / "work"), "--out", str(root / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = (root / "out").iterdir()
    return folder


def test_quick_run_reports_finite_figures_of_the_right_units(quick_run: Path) -> None:
    r = json.loads((quick_run / "results.json").read_text())
    assert r["quick"] is True
    for name in ("ours", "saelens"):
        assert "error" not in r["training"][name], r["training"][name].get("error")
    assert "error" not in r["decode"], r["decode"].get("error")
    measured = {"data": r["data"], "training": r["training"], "decode": r["decode"]}
    for path, value in _figures(measured):
        assert _unit_ok(path, value, r["settings"]["k"]), f"{'.'.join(map(str, path))} = {value!r}"
    s, d = r["settings"], r["data"]
    for name in ("ours", "saelens"):
        t = r["training"][name]
        assert t["train_tokens"] == s["steps"] * s["batch_size"]
        assert t["heldout"]["rows"] == d["n_rows"] - d["n_train"] > 0
    ours = r["training"]["ours"]
    assert ours["own_heldout"]["rows"] == ours["heldout"]["rows"]  # the same held-out rows
    assert abs(ours["own_heldout"]["fve"] - ours["heldout"]["fve"]) < 1e-4 and ours["own_heldout"]["l0"] == ours["heldout"]["l0"]
    dec = r["decode"]
    assert dec["d_sae"] == s["decode_width"] * dec["d_model"]
    assert dec["same_tokens"] is True and dec["captures_well_formed"] is True
    assert dec["captures"] == s["decode_rounds"] * s["decode_tokens"]


def test_quick_run_report_renders_every_section(quick_run: Path) -> None:
    text = (quick_run / "RESULTS-sae.md").read_text()
    for heading in ("# SAE benchmarks", "**Quick mode**", "## Training: TopK SAE, ours against SAELens",
                    "## Decode with SAE features streamed", "## Machine and versions"):
        assert heading in text, heading
    assert "failed" not in text.lower() and "n/a" not in text
    assert "| ours | " in text and "| saelens | " in text and "x hooks off" in text and "Target: >= 0.9x" in text


def test_heldout_metrics_match_our_mlx_metrics_on_a_rescaled_topk_sae(tmp_path: Path) -> None:
    import mlx_engine  # noqa: F401  (first: it picks the BLAS before MLX loads)
    import numpy as np

    from mlx_engine.sae import SAE, SAEConfig, reconstruction_metrics, save_sae

    rng = np.random.default_rng(3)
    d_in, d_sae = 24, 96
    weights = {"W_enc": rng.standard_normal((d_in, d_sae)) / 4, "W_dec": rng.standard_normal((d_sae, d_in)) * rng.uniform(0.2, 3, (d_sae, 1)),
               "b_enc": rng.standard_normal(d_sae) / 4, "b_dec": rng.standard_normal(d_in) / 4}
    sae = SAE(SAEConfig("topk", d_in=d_in, d_sae=d_sae, k=5, rescale_acts_by_decoder_norm=True),
              {k: v.astype(np.float32) for k, v in weights.items()})
    folder = save_sae(sae, tmp_path / "sae")
    x = (rng.standard_normal((300, d_in)) * 2).astype(np.float32)
    got = heldout_metrics(Path(folder), x, batch=64)
    want = reconstruction_metrics(sae, x, batch_size=64)
    assert got["rows"] == 300 and abs(got["fve"] - want["fve"]) < 1e-4 and abs(got["l0"] - want["l0"]) < 1e-9
    assert 0 < got["l0"] <= 5


def test_corpus_takes_every_module_round_robin() -> None:
    docs = sae_training.corpus(3, lines=50)
    assert len(docs) > 3 and all(doc.count("\n") <= 50 for doc in docs)
    firsts = [doc.splitlines()[0] for doc in docs[:3]]
    assert len(set(firsts)) == 3  # the first chunk of each of the three modules, in turn


def test_the_committed_full_run_is_well_formed_and_is_what_its_report_says(tmp_path: Path) -> None:
    """benchmarks/results-sae.json of the last full run passes the same unit walk, and RESULTS-sae.md is
    exactly its rendering (so no figure in the committed report was typed by hand)."""
    from benchmarks.sae_report import write_sae_report

    r = json.loads((REPO / "benchmarks" / "results-sae.json").read_text())
    assert r["quick"] is False
    for path, value in _figures({"data": r["data"], "training": r["training"], "decode": r["decode"]}):
        assert _unit_ok(path, value, r["settings"]["k"]), f"{'.'.join(map(str, path))} = {value!r}"
    write_sae_report(r, tmp_path / "RESULTS-sae.md")
    assert (tmp_path / "RESULTS-sae.md").read_text() == (REPO / "benchmarks" / "RESULTS-sae.md").read_text()
