"""Session-wide tiny checkpoints, built once by transformers and shared by the suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's command runs one pytest worker per core: each keeps to one BLAS thread (set before
    # MLX loads OpenBLAS) rather than every worker's threads contending for every core.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

import tiny_checkpoints as tc  # noqa: E402

# The reference models are tiny: one thread is faster than contending for both cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tc.build_llama(tmp_path_factory.mktemp("llama"))
    return path


@pytest.fixture(scope="session")
def gpt_oss_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tc.build_gpt_oss(tmp_path_factory.mktemp("gpt_oss"))
    return path


@pytest.fixture(scope="session")
def llama_kit(llama_checkpoint: Path):
    import mlx_engine

    return mlx_engine.load_model(llama_checkpoint)


@pytest.fixture(scope="session")
def gpt_oss_kit(gpt_oss_checkpoint: Path):
    import mlx_engine

    return mlx_engine.load_model(gpt_oss_checkpoint)
