"""The embedded default model loads offline through our own loader and has learned its text.

Held-out text: the standard-library files the training script kept out of training (listed in
its training_report.json), read from this interpreter's own standard library. The model is the
4-bit MLX checkpoint that ships with the package, scored by our gpt-oss implementation; the
training script's own figure (4.33 nats/token) was measured on the float model in torch.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_engine
from mlx_engine.loading import resolve_model_path

WINDOW = 256  # the context length the model was trained on
MAX_WINDOWS = 8
# The bound: at most 5.0 nats/token, against 8.32 for a uniform guess over the 4096-token
# vocabulary and 6.61 for the corpus's unigram frequencies. A model that had learned nothing
# beyond token frequencies could not get under the unigram figure.
LOSS_BOUND_NATS = 5.0


@pytest.fixture(scope="module")
def default_kit() -> mlx_engine.ModelKit:
    return mlx_engine.load_model("default")


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((resolve_model_path("default")[0] / "training_report.json").read_text())


def held_out_windows(kit: mlx_engine.ModelKit, report: dict) -> list[list[int]]:
    """One window per held-out file, past its licence header and module docstring."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    windows: list[list[int]] = []
    for rel in report["data"]["held_out_files"]:
        path = stdlib / rel
        if not path.is_file():
            continue
        ids = mlx_engine.tokenize(kit, path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= 2 * WINDOW:
            windows.append(ids[WINDOW : 2 * WINDOW])
    return windows[:MAX_WINDOWS]


def test_default_model_is_the_trained_gpt_oss(default_kit, report) -> None:
    info = default_kit.arch_info
    assert default_kit.native and default_kit.config["model_type"] == "gpt_oss"
    assert info.n_experts == report["model"]["experts"] and info.num_layers == report["model"]["layers"]
    assert default_kit.config["quantization"]["bits"] == 4
    assert report["training"]["steps"] > 100, "the shipped model must be the full training run"


def test_held_out_loss_is_far_below_the_baselines(default_kit, report) -> None:
    windows = held_out_windows(default_kit, report)
    if len(windows) < MAX_WINDOWS:
        pytest.skip(f"fewer than {MAX_WINDOWS} of the held-out standard-library files exist in this Python install")
    tokens = mx.array(windows, dtype=mx.uint32)
    logits = default_kit.model(tokens[:, :-1]).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logprobs, tokens[:, 1:, None].astype(mx.int32), axis=-1)
    loss = float(-mx.mean(picked).item())
    uniform = math.log(default_kit.arch_info.vocab_size)
    unigram = report["evaluation"]["unigram_baseline_nats_per_token"]
    print(f"held-out loss {loss:.3f} nats/token over {len(windows)} windows")
    assert np.isfinite(loss)
    assert loss < LOSS_BOUND_NATS, f"held-out loss {loss:.3f} nats/token (uniform {uniform:.2f}, unigram {unigram:.2f})"
    assert loss < unigram - 1.0 and loss < uniform - 3.0
