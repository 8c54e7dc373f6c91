"""The long-prompt benchmarks run and report well-formed figures (structure, never speed).

`benchmarks.prefill_ops` times each op of a llama-125m layer in MLX and torch; here one
tiny length checks that every op runs in both libraries and that the layer sums and shares
add up. `benchmarks.long_prompts.table` renders measured rows and marks failures and gaps.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import long_prompts, prefill_ops  # noqa: E402


def test_prefill_ops_times_every_op_in_both_libraries() -> None:
    result = prefill_ops.measure(64, repeats=1)
    assert set(prefill_ops.PER_LAYER) <= set(result["ops"])
    for name, op in result["ops"].items():
        assert op["mlx_s"] > 0 and op["torch_s"] > 0 and math.isfinite(op["ratio"]), name
    want = sum(result["ops"][k]["mlx_s"] * n for k, n in prefill_ops.PER_LAYER.items())
    assert math.isclose(result["layer_mlx_s"], want) and math.isclose(sum(result["mlx_share"].values()), 1.0)
    table = prefill_ops.markdown([result])
    assert table.count("\n") == len(result["ops"]) + 2 and "64 tok" in table
    longer = {**result, "tokens": 8192, "ops": {k: v for k, v in result["ops"].items() if not k.startswith("softmax")}}
    both = prefill_ops.markdown([result, longer]).splitlines()  # past 4096 tokens the [heads, t, t] softmax is skipped
    assert len(both) == len(table.splitlines()) and both[2].startswith("| softmax") and both[2].endswith("| not run at this length |")


def test_long_prompt_table_shows_each_measurement_and_the_ratios() -> None:
    rows = [
        {"contender": "ours", "mode": "generate", "tokens": 512, "seconds": 2.0, "peak_rss": 2**30},
        {"contender": "transformers", "mode": "none", "tokens": 512, "seconds": 1.0, "peak_rss": 2**30},
        {"contender": "ours", "mode": "residuals", "tokens": 512, "error": "over 10 s"},
    ]
    table = long_prompts.table(rows).splitlines()
    assert len(table) == 3
    assert "2.00 (1.00)" in table[2] and "failed" in table[2] and "| 2.00x |" in table[2] and table[2].endswith("n/a | n/a |")


def test_blas_paths_report_shows_each_environment_and_the_ratios() -> None:
    from benchmarks import blas_paths

    envs = blas_paths.environments("/usr/lib/libopenblas.so.0")
    assert "LD_PRELOAD" not in envs["default"] and "MLX_ENGINE_NO_OPENBLAS" not in envs["default"]
    assert envs["LD_PRELOAD"]["LD_PRELOAD"] == "/usr/lib/libopenblas.so.0" and envs["reference"]["MLX_ENGINE_NO_OPENBLAS"] == "1"
    rows = [{"path": "default", "tokens": 512, "seconds": 1.1}, {"path": "LD_PRELOAD", "tokens": 512, "seconds": 1.0},
            {"path": "reference", "tokens": 512, "error": "over 10 s"}]
    text = blas_paths.report({"command": "c", "started": "s", "finished": "f", "model": "m", "rows": rows,
                              "blas": {"default": "openblas", "LD_PRELOAD": "openblas", "reference": "opted-out"},
                              "machine": {}, "versions": {}, "load_average_start": (0, 0, 0), "load_average_end": (0, 0, 0)})
    assert "| 512 | 1.10 | 1.00 | failed | 1.10x | n/a |" in text
    assert "default: openblas; LD_PRELOAD: openblas; reference: opted-out" in text and "over 10 s" in text
