"""examples/steering.py: a difference-of-means vector moves sampled text toward a token class.

Two models. One where the direction is known to exist by construction: a tied-embedding
Llama whose blocks write nothing (o_proj and down_proj are zero), so the residual stream
at every layer is the current token's embedding and the logits are embedding similarities;
the mean residual of newline-rich prompts minus that of newline-free prompts then points
at the newline embeddings, and adding it must raise the share of sampled newlines.
And the embedded default model, with the example's own defaults.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine.loading import DEFAULT_MODEL_DIR

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "steering.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("steering_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


@pytest.fixture(scope="module")
def embedding_echo_kit(tmp_path_factory: pytest.TempPathFactory):
    path, model = tc.build_llama(tmp_path_factory.mktemp("echo"), tie_word_embeddings=True)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    return mlx_engine.load_model(path)


def test_steering_raises_the_class_frequency_where_the_direction_exists(example, embedding_echo_kit) -> None:
    report = example.run(embedding_echo_kit, "newlines", layer=1, scale=4.0, n_tokens=32, seed=0)
    assert report.tokens_per_run == 32 * len(example.NEUTRAL_PROMPTS)
    assert report.steered_frequency > report.plain_frequency + 0.2, report
    again = example.run(embedding_echo_kit, "newlines", layer=1, scale=4.0, n_tokens=32, seed=0)
    assert (again.plain_frequency, again.steered_frequency) == (report.plain_frequency, report.steered_frequency)
    # Scale 0 is no steering at all: the same tokens as unsteered.
    zero = example.run(embedding_echo_kit, "newlines", layer=1, scale=0.0, n_tokens=32, seed=0)
    assert zero.steered_frequency == zero.plain_frequency and zero.steered_sample == zero.plain_sample


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the embedded default model is not in this checkout")
def test_example_steers_the_default_model(example, capsys: pytest.CaptureFixture[str]) -> None:
    assert example.main(["default", "--tokens", "32"]) == 0
    out = capsys.readouterr().out
    line = out.strip().splitlines()[-1]
    plain, steered = (float(x.split()[0]) for x in line.split(": ")[1].split(", "))
    assert steered > plain, out
