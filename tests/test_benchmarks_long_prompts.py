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


def test_long_prompt_table_shows_each_measurement_and_the_ratios() -> None:
    rows = [
        {"contender": "ours", "mode": "generate", "tokens": 512, "seconds": 2.0, "peak_rss": 2**30},
        {"contender": "transformers", "mode": "none", "tokens": 512, "seconds": 1.0, "peak_rss": 2**30},
        {"contender": "ours", "mode": "residuals", "tokens": 512, "error": "over 10 s"},
    ]
    table = long_prompts.table(rows).splitlines()
    assert len(table) == 3
    assert "2.00 (1.00)" in table[2] and "failed" in table[2] and "| 2.00x |" in table[2] and table[2].endswith("n/a | n/a |")
