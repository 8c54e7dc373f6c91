"""`verify` passes on models we load right, and names where a model loaded wrong parts from transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine.hooks.names import offered_components
from mlx_engine.tools.convert import quantize_checkpoint

BUILDERS: dict[str, Callable[[Path], Any]] = {
    "llama": lambda p: tc.build_llama(p, "llama"),
    "gpt2": tc.build_gpt2,
    "gpt_oss": tc.build_gpt_oss,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify")
    return {name: build(root / name)[0] for name, build in BUILDERS.items()}


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mlx_engine.cli", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_verify_passes_on_every_component_of_a_native_model(checkpoints: dict[str, Path], name: str) -> None:
    kit = mlx_engine.load_model(checkpoints[name])
    report = mlx_engine.verify(kit, tokens=3)
    assert report.passed, report.to_text()
    assert not report.unchecked, [r.name for r in report.unchecked]
    compared = {r.component for r in report.rows}
    offered = {c.value for c in offered_components(kit.arch_info, kit.native)} - {"expert_pre", "expert_post"}
    assert compared == offered
    assert {r.layer for r in report.rows} == {None, *range(kit.arch_info.num_layers)}
    assert all(r.steps == 4 for r in report.rows)  # the prompt and three decode steps
    assert len(report.generated) == 4 and report.tokens_agree


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_oss"])
def test_a_4bit_conversion_verifies_against_its_dequantized_weights(checkpoints: dict[str, Path], tmp_path: Path, name: str) -> None:
    kit = mlx_engine.load_model(quantize_checkpoint(checkpoints[name], tmp_path / "q4", bits=4, group_size=32))
    assert kit.config["quantization"]["bits"] == 4
    report = mlx_engine.verify(kit, tokens=2)
    assert report.passed, report.to_text()


def test_a_model_loaded_with_a_wrong_rope_theta_fails_at_layer_0_query(checkpoints: dict[str, Path]) -> None:
    kit = mlx_engine.load_model(checkpoints["llama"], config_overrides={"rope_theta": 1.0})
    assert kit.model.args.rope_theta == 1.0 and kit.config_overrides == {"rope_theta": 1.0}
    report = mlx_engine.verify(kit, tokens=2)
    assert not report.passed
    # Everything before the rotary embedding agrees; the first tensor that differs is the rotated query.
    rows = {r.name: r for r in report.rows}
    assert rows["embedding"].ok and rows["layers.0.layernorm"].ok and rows["layers.0.value"].ok
    assert report.failures[0].name == "layers.0.query"
    assert "first layers.0.query" in report.verdict() and "greedy tokens differ" in report.verdict()
    assert "config_overrides {'rope_theta': 1.0}" in report.to_text()


def test_cli_verify_passes(checkpoints: dict[str, Path]) -> None:
    done = cli("verify", "--model", str(checkpoints["llama"]), "--tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "PASS: every compared tensor within atol 0.0001" in done.stdout
    assert "layers.2.attention_pattern" in done.stdout


def test_cli_verify_exits_non_zero_naming_the_tensor_beyond_tolerance(checkpoints: dict[str, Path]) -> None:
    """With no tolerance at all, float32 rounding is a difference: the exit status and message say where."""
    done = cli("verify", "--model", str(checkpoints["gpt2"]), "--tokens", "1", "--atol", "0", "--rtol", "0")
    assert done.returncode == 1, done.stderr
    assert "error: FAIL: " in done.stderr and "beyond atol 0, rtol 0" in done.stderr and "first layers.0." in done.stderr


def test_cli_verify_without_torch_says_how_to_install(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """An environment without torch: this venv's site-packages less torch, on a Python started without `site`."""
    import site

    (packages,) = [Path(p) for p in site.getsitepackages() if (Path(p) / "mlx_lm").exists()]
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in packages.iterdir():
        if entry.name.split("-")[0] not in ("torch", "functorch", "torchgen") and entry.suffix != ".pth":
            (shadow / entry.name).symlink_to(entry)
    repo = Path(mlx_engine.__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(repo), str(shadow)]))
    code = "import sys; from mlx_engine.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, "verify", "--model", str(checkpoints["llama"])],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 2, done.stderr
    assert 'pip install "mlx-engine[verify]"' in done.stderr and "needs torch" in done.stderr
