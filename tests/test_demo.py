"""`mlx-engine demo` end to end: run the real command, then check every file against the others.

The demo runs as a subprocess, as a user would start it, on the embedded default model.
The checks cross the files: the safetensors capture must hold exactly the values of the
NeuroScope JSON (float32 values are exact in JSON's float64, so the tolerance is zero),
the pictures must open and carry their title, axis labels, token strings, colour bar and
generation boundary (ink in those regions of the PNG, the text itself in the SVG twin),
index.html must show the run from disk with relative links only, and the summary must
describe each file.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_engine.demo import (
    ATTENTION_PNG,
    ATTENTION_SVG,
    CAPTURE_FILE,
    INDEX_FILE,
    NEUROSCOPE_FILE,
    RESIDUAL_PNG,
    RESIDUAL_SVG,
    SMALLTALK_FILE,
    SUMMARY_FILE,
    attention_title,
    new_run_folder,
    residual_title,
    token_label,
    write_attention_pictures,
)
from mlx_engine.demo.pictures import attention_layout, residual_norms
from mlx_engine.loading import DEFAULT_MODEL_DIR
from mlx_engine.wire.files import parse_tensor_key

pytestmark = pytest.mark.slow  # end to end: left out of the quick loop (-m "not slow"), run by the full suite

OUTPUT_FILES = (NEUROSCOPE_FILE, CAPTURE_FILE, SMALLTALK_FILE, RESIDUAL_PNG, RESIDUAL_SVG, ATTENTION_PNG, ATTENTION_SVG, INDEX_FILE, SUMMARY_FILE)
FOLDER_NAME = re.compile(r"^\d{8}-\d{6}(-\d+)?$")
MAX_TOKENS = 12
SVG_NS = "{http://www.w3.org/2000/svg}"


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
    names = {parse_tensor_key(k)[:3]: k for k in tensors}  # type: ignore[index]
    assert sorted(tensors) == sorted(tensors, key=lambda k: parse_tensor_key(k)[:3])  # type: ignore[index]  # names sort in step order
    compared = 0
    for hook_id, entries in neuroscope["activations"].items():
        chunk_of_step: dict[int, int] = {}
        for entry in entries:
            chunk = chunk_of_step.get(entry["step"], 0)
            chunk_of_step[entry["step"]] = chunk + 1
            key = names[(hook_id, entry["step"], chunk)]
            stored = np.array(tensors.pop(key).astype(mx.float32))
            assert list(stored.shape) == entry["shape"], key
            assert json.loads(metadata[key])["positions"] == entry["positions"], key
            # Tolerance zero: a float32 value survives JSON's float64 exactly.
            assert np.array_equal(stored.astype(np.float64), entry_array(entry)), key
            compared += 1
    assert not tensors, f"tensors without a JSON entry: {sorted(tensors)[:5]}"
    assert compared == len(neuroscope["activations"]) * MAX_TOKENS


def tokens_of(neuroscope: dict) -> list[str]:
    return list(neuroscope["prompt_tokens"]) + list(neuroscope["generated_tokens"])


def svg_texts(path: Path) -> list[str]:
    """Every text run of an SVG (matplotlib writes text as <text> when svg.fonttype is 'none')."""
    root = ET.parse(path).getroot()
    return ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]


def inked(region: np.ndarray) -> float:
    """The share of a region's pixels that are not (near) white."""
    return float((region.min(axis=-1) < 200).mean())


def check_png_regions(path: Path) -> np.ndarray:
    """The PNG opens, and its title strip, left labels, bottom labels and right colour bar hold ink."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    assert width > 300 and height > 200, (path.name, width, height)
    regions = {
        "title": pixels[: max(4, height // 25), width // 4 : 3 * width // 4],
        "left labels": pixels[height // 5 : 4 * height // 5, : width // 20],
        "bottom labels": pixels[-height // 6 :, width // 10 : 9 * width // 10],
        "colour bar": pixels[height // 4 : 3 * height // 4, -width // 12 :],
    }
    for name, region in regions.items():
        assert inked(region) > 0.005, f"{path.name}: the {name} region is blank"
    assert len({tuple(c) for c in pixels.reshape(-1, 3)[:: max(1, pixels.size // 30000)]}) > 50, f"{path.name} is nearly one colour"
    return pixels


def test_residual_picture_has_its_labels_tokens_and_scale(folder: Path, neuroscope: dict) -> None:
    pixels = check_png_regions(folder / RESIDUAL_PNG)
    boundary_red = (np.abs(pixels - np.array([214, 39, 40])).sum(axis=-1) < 40).sum()
    assert boundary_red > 50, "no prompt/generation boundary line"
    texts = svg_texts(folder / RESIDUAL_SVG)
    assert residual_title("default") in texts
    assert {"layer", "token (position, left to right)", "‖residual‖₂ (log scale)", "generation →"} <= set(texts)
    assert {"0", "1", "2", "3"} <= set(texts)  # layer numbers
    labels = [token_label(t) for t in tokens_of(neuroscope)[: positions(neuroscope)]]
    assert all(label in texts for label in labels), [label for label in labels if label not in texts][:5]
    norms = residual_norms(neuroscope, [f"layers.{i}.residual" for i in range(4)])
    assert {f"{norms.min():.3g}", f"{norms.max():.3g}"} <= set(texts)  # the colour bar runs from the smallest norm to the largest


def test_attention_picture_has_heads_tokens_sinks_and_scale(folder: Path, neuroscope: dict, model_config: dict) -> None:
    (hook_id,) = [h for h in neuroscope["activations"] if h.endswith(".attention_pattern")]
    entries = neuroscope["activations"][hook_id]
    prompt = entry_array(entries[0])  # [heads, T, T] for the prompt
    assert np.all(np.triu(prompt, k=1) == 0), "a prompt position attends to a later one"
    for entry in entries:
        rows = entry_array(entry).sum(axis=-1)
        assert np.all((rows >= 0) & (rows <= 1 + 1e-5)), entry["step"]  # sink mass is excluded
    check_png_regions(folder / ATTENTION_PNG)
    texts = svg_texts(folder / ATTENTION_SVG)
    layer = int(hook_id.split(".")[1])
    heads = entries[0]["shape"][0]
    (title,) = [t for t in texts if t.startswith(attention_title(layer, model_config["layer_types"][layer]))]
    assert "rows exclude the sink's share (sink share = 1 − row sum)" in title
    assert {f"head {h}" for h in range(heads)} | {"key token", "query token", "attention probability (square-root scale)"} <= set(texts)
    labels = {token_label(t) for t in tokens_of(neuroscope)[: positions(neuroscope)]}
    assert labels <= set(texts)


def test_index_page_shows_the_run_from_disk(folder: Path, neuroscope: dict) -> None:
    class Links(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.refs: list[str] = []
            self.values: list[float] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            found = dict(attrs)
            self.refs += [found[a] for a in ("src", "href") if a in found]
            if "data-value" in found:
                self.values.append(float(found["data-value"]))

    page = (folder / INDEX_FILE).read_text(encoding="utf-8")
    parser = Links()
    parser.feed(page)
    assert parser.refs and all("/" not in ref and ":" not in ref for ref in parser.refs), parser.refs
    assert all((folder / ref).is_file() for ref in parser.refs), parser.refs
    assert {RESIDUAL_SVG, ATTENTION_SVG, SUMMARY_FILE, CAPTURE_FILE} <= set(parser.refs)
    last = max(int(h.split(".")[1]) for h in neuroscope["activations"] if h.endswith(".residual"))
    norms = np.zeros(positions(neuroscope))
    for entry in neuroscope["activations"][f"layers.{last}.residual"]:
        start, stop = entry["positions"]
        norms[start:stop] = np.linalg.norm(entry_array(entry), axis=-1)
    np.testing.assert_allclose(parser.values, norms, rtol=1e-12)  # one coloured token per position with activations
    assert html.escape(neuroscope["generated_tokens"][0]) in page and re.search(r"http://127\.0\.0\.1:\d+/ui/", page)


def test_summary_describes_every_file_and_the_run(folder: Path, neuroscope: dict) -> None:
    summary = (folder / SUMMARY_FILE).read_text(encoding="utf-8")
    for name in OUTPUT_FILES:
        assert name in summary, name
    for hook_id in neuroscope["activations"]:
        assert f"`{hook_id}`" in summary
    assert residual_title("default") in summary and "colour bar" in summary
    assert re.search(r"Its viewer was at http://127\.0\.0\.1:\d+/ui/ while the demo ran", summary)
    assert "each row excludes the sink's share" in summary
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
    """A 64-head layer (gpt-oss-20b) is drawn as 8 rows of 8 panels, not one 64-panel strip."""
    n, heads = 5, 64
    probs = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    grid = np.where(np.tril(np.ones((n, n))) > 0, probs, np.nan)
    tokens = ["a", " b", "\n", "c", "d"]
    sinks = write_attention_pictures(np.broadcast_to(grid, (heads, n, n)).copy(), tokens, 3, 7, None, tmp_path / "a.png", tmp_path / "a.svg")
    assert attention_layout(heads) == (8, 8) and attention_layout(4) == (2, 2)
    assert not sinks  # rows sum to 1: no sink, and the title says so
    texts = svg_texts(tmp_path / "a.svg")
    assert {"head 0", "head 63"} <= set(texts) and any("rows sum to 1 (no attention sink)" in t for t in texts)
    assert Image.open(tmp_path / "a.png").size[0] > 1000


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
