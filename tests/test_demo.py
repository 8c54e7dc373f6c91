"""`mlx-engine demo` end to end: run the real command, then check every file against the others.

The demo runs as a subprocess, as a user would start it, on the embedded default model.
The checks cross the files: the safetensors capture must hold exactly the values of the
NeuroScope JSON (float32 values are exact in JSON's float64, so the tolerance is zero),
the pictures must have the sizes the captured shapes imply and colours that follow the
data, and the summary must describe each file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_engine.demo import (
    ATTENTION_CELL,
    ATTENTION_PNG,
    CAPTURE_FILE,
    CELL,
    NEUROSCOPE_FILE,
    RESIDUAL_PNG,
    SMALLTALK_FILE,
    SUMMARY_FILE,
    HEAD_GAP,
    HEADS_PER_ROW,
    attention_png_size,
    new_run_folder,
    write_attention_png,
)
from mlx_engine.loading import DEFAULT_MODEL_DIR

OUTPUT_FILES = (NEUROSCOPE_FILE, CAPTURE_FILE, SMALLTALK_FILE, RESIDUAL_PNG, ATTENTION_PNG, SUMMARY_FILE)
FOLDER_NAME = re.compile(r"^\d{8}-\d{6}(-\d+)?$")
MAX_TOKENS = 12
VIRIDIS_LOW, VIRIDIS_HIGH, MASKED = (68, 1, 84), (253, 231, 37), (40, 40, 40)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_engine.cli", "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Two demo runs into the same --out-root; answers the root and both printed folders."""
    root = tmp_path_factory.mktemp("demo")
    out_root = root / "out"
    folders = []
    for _ in range(2):
        done = run_cli("--out-root", str(out_root), "--max-tokens", str(MAX_TOKENS), cwd=root)
        assert done.returncode == 0, done.stderr
        folders.append(Path(done.stdout.strip().splitlines()[-1]))
    return out_root, folders


@pytest.fixture(scope="module")
def folder(demo_runs: tuple[Path, list[Path]]) -> Path:
    return demo_runs[1][0]


@pytest.fixture(scope="module")
def neuroscope(folder: Path) -> dict:
    return json.loads((folder / NEUROSCOPE_FILE).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model_config() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())


def entry_array(entry: dict) -> np.ndarray:
    return np.asarray(entry["data"], dtype=np.float64).reshape(entry["shape"])


def positions(neuroscope: dict) -> int:
    return len(neuroscope["prompt_tokens"]) + len(neuroscope["generated_tokens"]) - 1


def test_each_run_makes_a_new_timestamped_folder_with_every_file(demo_runs: tuple[Path, list[Path]]) -> None:
    out_root, folders = demo_runs
    assert folders[0] != folders[1]
    assert sorted(p for p in out_root.iterdir()) == sorted(folders)
    for f in folders:
        assert f.parent == out_root and FOLDER_NAME.match(f.name), f
        for name in OUTPUT_FILES:
            assert (f / name).stat().st_size > 0, f / name


def test_hooks_are_every_residual_and_the_last_full_attention_pattern(neuroscope: dict, model_config: dict) -> None:
    layers = model_config["num_hidden_layers"]
    last_full = max(i for i, t in enumerate(model_config["layer_types"]) if t == "full_attention")
    expected = {f"layers.{i}.residual" for i in range(layers)} | {f"layers.{last_full}.attention_pattern"}
    assert set(neuroscope["activations"]) == expected
    assert len(neuroscope["generated_tokens"]) == MAX_TOKENS


def test_safetensors_capture_equals_the_neuroscope_json(folder: Path, neuroscope: dict) -> None:
    """Every tensor of the download equals the JSON entry of the same hook, step and chunk, exactly."""
    tensors, metadata = mx.load(str(folder / CAPTURE_FILE), return_metadata=True)
    user = json.loads(metadata["user_metadata"])
    assert json.loads(user["generated_token_ids"]) == neuroscope["generated_token_ids"]
    assert json.loads(user["prompt_tokens_text"]) == neuroscope["prompt_tokens"]
    compared = 0
    for hook_id, entries in neuroscope["activations"].items():
        chunk_of_step: dict[int, int] = {}
        for entry in entries:
            chunk = chunk_of_step.get(entry["step"], 0)
            chunk_of_step[entry["step"]] = chunk + 1
            key = f"{hook_id}/step{entry['step']}/chunk{chunk}"
            stored = np.array(tensors.pop(key).astype(mx.float32))
            assert list(stored.shape) == entry["shape"], key
            assert json.loads(metadata[key])["positions"] == entry["positions"], key
            # Tolerance zero: a float32 value survives JSON's float64 exactly.
            assert np.array_equal(stored.astype(np.float64), entry_array(entry)), key
            compared += 1
    assert not tensors, f"tensors without a JSON entry: {sorted(tensors)[:5]}"
    assert compared == len(neuroscope["activations"]) * MAX_TOKENS


def test_residual_heatmap_is_layers_by_tokens_cells_coloured_by_the_norms(folder: Path, neuroscope: dict) -> None:
    hooks = sorted((h for h in neuroscope["activations"] if h.endswith(".residual")), key=lambda h: int(h.split(".")[1]))
    n = positions(neuroscope)
    norms = np.zeros((len(hooks), n))
    for row, hook_id in enumerate(hooks):
        for entry in neuroscope["activations"][hook_id]:
            start, stop = entry["positions"]
            norms[row, start:stop] = np.linalg.norm(entry_array(entry), axis=-1)
    image = Image.open(folder / RESIDUAL_PNG).convert("RGB")
    assert image.size == (n * CELL, len(hooks) * CELL)
    pixels = np.asarray(image)
    lo = np.unravel_index(norms.argmin(), norms.shape)
    hi = np.unravel_index(norms.argmax(), norms.shape)
    assert tuple(pixels[lo[0] * CELL + CELL // 2, lo[1] * CELL + CELL // 2]) == VIRIDIS_LOW
    assert tuple(pixels[hi[0] * CELL + CELL // 2, hi[1] * CELL + CELL // 2]) == VIRIDIS_HIGH


def test_attention_picture_matches_the_captured_pattern(folder: Path, neuroscope: dict) -> None:
    (hook_id,) = [h for h in neuroscope["activations"] if h.endswith(".attention_pattern")]
    entries = neuroscope["activations"][hook_id]
    heads = entries[0]["shape"][0]
    n = positions(neuroscope)
    prompt = entry_array(entries[0])  # [heads, T, T] for the prompt
    assert np.all(np.triu(prompt, k=1) == 0), "a prompt position attends to a later one"
    for entry in entries:
        rows = entry_array(entry).sum(axis=-1)
        assert np.all((rows >= 0) & (rows <= 1 + 1e-5)), entry["step"]  # sink mass is excluded
    image = Image.open(folder / ATTENTION_PNG).convert("RGB")
    assert image.size == attention_png_size(heads, n)
    pixels = np.asarray(image)
    assert tuple(pixels[0, (n - 1) * ATTENTION_CELL + 1]) == MASKED  # head 0, query 0 cannot see the last key


def test_summary_describes_every_file_and_the_run(folder: Path, neuroscope: dict) -> None:
    summary = (folder / SUMMARY_FILE).read_text(encoding="utf-8")
    for name in OUTPUT_FILES:
        assert name in summary, name
    for hook_id in neuroscope["activations"]:
        assert f"`{hook_id}`" in summary
    assert f"{CELL} x {CELL}" in summary
    assert f"{positions(neuroscope) * CELL} pixels wide" in summary
    assert str((folder / CAPTURE_FILE).stat().st_size) in summary
    assert "Same generated tokens on both paths: yes" in summary


def test_smalltalk_client_targets_the_demo_server(folder: Path) -> None:
    source = (folder / SMALLTALK_FILE).read_text(encoding="utf-8")
    assert "NeuroScopeMLXClient" in source and "ZnClient" in source
    assert re.search(r"baseUrl: 'http://127\.0\.0\.1:\d+'", source)


def test_folder_names_never_collide(tmp_path: Path) -> None:
    from datetime import datetime

    now = datetime(2025, 1, 2, 3, 4, 5)
    made = [new_run_folder(tmp_path, now).name for _ in range(3)]
    assert made == ["20250102-030405", "20250102-030405-2", "20250102-030405-3"]


def test_many_heads_wrap_into_rows(tmp_path: Path) -> None:
    """A 64-head layer (gpt-oss-20b) is drawn as 8 rows of 8 squares, not one 64-square strip."""
    n, heads = 5, 64
    probs = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    write_attention_png(np.broadcast_to(probs, (heads, n, n)).copy(), tmp_path / "a.png")
    side = n * ATTENTION_CELL
    per_row = HEADS_PER_ROW
    expected = (per_row * side + (per_row - 1) * HEAD_GAP, (heads // per_row) * side + (heads // per_row - 1) * HEAD_GAP)
    assert attention_png_size(heads, n) == expected
    assert Image.open(tmp_path / "a.png").size == expected


def test_missing_model_fails_with_exit_code_2_and_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    done = run_cli("--model", str(missing), "--out-root", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr and "not found" in done.stderr and str(missing) in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_max_tokens_fails_with_exit_code_2(tmp_path: Path) -> None:
    done = run_cli("--max-tokens", "0", "--out-root", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "--max-tokens" in done.stderr
