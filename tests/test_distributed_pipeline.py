"""Pipeline parallelism over 2 ranks equals the single-process run: logits, tokens, captures, edits.

The job is tests/distributed_rank.py in "pipeline" mode (two ring ranks on 127.0.0.1, as in
tests/test_distributed_tensor.py). Rank 0 holds the first blocks, rank 1 the rest; rank 0
is handed every capture (the other rank's blocks replayed from what that rank sends), so
rank 0's results are compared with the single-process ones:

- tokens (greedy) and capture metadata: identical;
- logits, logprobs and capture data: within ATOL/RTOL (1e-4). A pipeline computes each block
  exactly as one process does, so the differences seen are zero or rounding-level; the
  tolerance is the tensor-parallel one, far below any real error.
- rank 1 samples the same tokens with the same logits (every rank runs the LM head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_checkpoints as tc
from test_distributed_tensor import RANKS, _close, _compare, build_matrix, quantized, run_matrix, single_process

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite


def gemma3(tmp: Path) -> Path:
    from test_gemma3 import build_gemma3

    return build_gemma3(tmp / "src")


def qwen3_moe(tmp: Path) -> Path:
    from test_qwen3_moe import build_qwen3_moe

    return build_qwen3_moe(tmp / "src", "mixed")


CHECKPOINTS = {
    "llama": lambda tmp: tc.build_llama(tmp / "src")[0],
    "gpt_oss_4bit": lambda tmp: quantized(tc.build_gpt_oss(tmp / "src")[0], tmp / "q4"),
    # Sliding windows and sandwich norms; an MoE whose router sites send their expert context.
    "gemma3": gemma3,
    "qwen3_moe": qwen3_moe,
}
EDITS = ["residual_steer", "z_ablate_last", "units_add"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, list[dict[str, Any]]]]:
    """The checkpoints, and each one's results from one pipeline job over them all."""
    tmp = tmp_path_factory.mktemp("pipe")
    checkpoints = build_matrix(CHECKPOINTS, tmp)
    out_dir = tmp / "out"
    out_dir.mkdir()
    return checkpoints, run_matrix(checkpoints, out_dir, parallel="pipeline")


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def job(request: pytest.FixtureRequest, matrix) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    checkpoints, ranks = matrix
    return request.param, single_process(checkpoints[request.param]), ranks[request.param]


def test_each_rank_holds_a_contiguous_range_of_blocks_and_only_their_weights(job) -> None:
    _, _, ranks = job
    held = [r["held_blocks"] for r in ranks]
    n = len(held[0])
    assert [h.tolist() for h in held] == [[i < (n + 1) // 2 for i in range(n)], [i >= (n + 1) // 2 for i in range(n)]]
    for r, h in zip(ranks, held):
        names = [str(k) for k in r["parameters"]]
        blocks = {int(k.split(".")[2]) for k in names if k.startswith("model.layers.")}
        assert blocks == {i for i in range(n) if h[i]}, blocks
        assert any(k.startswith("model.embed_tokens.") for k in names)


def test_logits_and_greedy_tokens_equal_the_single_process_run(job) -> None:
    name, single, ranks = job
    for got in ranks:
        np.testing.assert_array_equal(got["all_hooks/tokens"], single["all_hooks/tokens"])
        _close(name, "logits", got["logits"], single["logits"])
        _close(name, "logprobs", got["all_hooks/logprobs"], single["all_hooks/logprobs"])
        _close(name, "top_logprobs", got["all_hooks/top_logprobs"], single["all_hooks/top_logprobs"])


def test_every_capture_at_every_layer_reaches_rank_0_equal_to_the_single_process_capture(job) -> None:
    name, single, ranks = job
    n = _compare(name, ranks[0], single, "all_hooks/capture/")
    layers = {k.split("/")[2].split(".")[1] for k in single if k.startswith("all_hooks/capture/layers.")}
    assert len(layers) == len(ranks[0]["held_blocks"]) and n > 500


@pytest.mark.parametrize("edit", EDITS)
def test_an_intervention_gives_the_single_process_result(job, edit: str) -> None:
    name, single, ranks = job
    _compare(name, ranks[0], single, f"edit/{edit}/")
    assert not np.allclose(single[f"edit/{edit}/logprobs"], single["all_hooks/logprobs"], atol=1e-3), f"{edit} changed nothing"
    np.testing.assert_array_equal(ranks[1][f"edit/{edit}/tokens"], single[f"edit/{edit}/tokens"])


def test_the_job_ran_on_two_ranks(job) -> None:
    _, _, ranks = job
    assert [r["world"].tolist() for r in ranks] == [[i, RANKS] for i in range(RANKS)]
