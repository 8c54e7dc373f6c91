"""`mlx-engine analyze circuits|weights` write a new folder each run: manifest, reports, and every
figure as PNG (opened, sized) and SVG (its title and axis labels present as text), with JSON and
CSV of its numbers beside it.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import mlx_engine
from mlx_engine.cli import main

CLEAN = "x = 1\ny = x + 1\nprint(x"
CORRUPTED = "x = 1\ny = x + 1\nprint(y"

# Axis and colour-bar labels each figure must carry (besides its title from the manifest).
LABELS = {
    "logit_lens": ["position: input token", "residual stream after layer", "p(next token)"],
    "logit_lens_kl": ["position: input token", "KL(final || layer) [nats]"],
    "dla_components": ["component", "contribution to the logit difference"],
    "dla_heads": ["head", "layer", "contribution to the logit difference"],
    "head_scores": ["head", "layer", "induction score", "previous-token score", "sink mass"],
    "patching_residual": ["restored position: clean token / corrupted token", "layer", "recovered fraction"],
    "patching_z": ["restored head (all positions)", "layer"],
    "singular_values": ["singular value index i", "sigma_i / sigma_1", "layer (black: embedding and head)"],
    "weights_by_layer": ["layer", "matrix", "stable rank ||W||_F^2 / ||W||_2^2"],
    "checkpoint_comparison": ["checkpoint k", "frobenius_norm"],
}


def svg_texts(path: Path) -> list[str]:
    """Every text element's content: the SVG keeps text as text (svg.fonttype = none)."""
    return ["".join(node.itertext()) for node in ET.parse(path).iter() if node.tag.endswith("}text")]


def check_folder(folder: Path, kind: str) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == kind
    assert sorted(p.name for p in folder.iterdir()) == manifest["files"]
    assert {"report.md", "report.html", "manifest.json"} <= set(manifest["files"])
    md, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
    for figure in manifest["figures"]:
        files = figure["files"]
        assert set(files) == {"png", "svg", "json", "csv"}
        with Image.open(folder / files["png"]) as image:
            assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200, image.size
        texts = svg_texts(folder / files["svg"])
        assert figure["title"] in texts, (figure["name"], figure["title"])
        for label in LABELS[figure["name"]]:
            assert any(label in t for t in texts), (figure["name"], label)
        json.loads((folder / files["json"]).read_text())
        lines = (folder / files["csv"]).read_text().splitlines()
        assert len(lines) >= 2 and "," in lines[0]
        assert files["png"] in md and files["png"] in page
    return manifest


def test_analyze_circuits_writes_a_new_folder_each_time(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    kit = mlx_engine.load_model("default")
    assert len(mlx_engine.tokenize(kit, CLEAN)) == len(mlx_engine.tokenize(kit, CORRUPTED))
    args = ["analyze", "circuits", "--model", "default", "--prompt", CLEAN, "--corrupted", CORRUPTED,
            "--target", ")", "--foil", ",", "--repeat-length", "8", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    first = Path(capsys.readouterr().out.strip())
    manifest = check_folder(first, "circuits")
    names = {f["name"] for f in manifest["figures"]}
    assert names == {"logit_lens", "logit_lens_kl", "dla_components", "dla_heads", "head_scores", "patching_residual", "patching_z"}
    assert manifest["arguments"]["target"] == ")" and first.parent == tmp_path
    dla = json.loads((first / "dla_components.json").read_text())
    assert dla["target_string"] == ")" and abs(dla["residual_error"]) < 1e-3
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    # A second run into the same --out (within the same second, as like as not) gets its own folder.
    assert main(["analyze", "weights", "--model", "default", "--include", "^lm_head$", "--out", str(tmp_path), "--quiet"]) == 0
    second = Path(capsys.readouterr().out.strip())
    assert second != first and second.parent == tmp_path
    assert json.loads((second / "manifest.json").read_text())["kind"] == "weights"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # the first folder is untouched


def test_analyze_weights_with_checkpoints(llama_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    later = tmp_path / "later"
    shutil.copytree(llama_checkpoint, later)
    weights = load_file(str(later / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"] * 0.5
    save_file(weights, str(later / "model.safetensors"), metadata={"format": "pt"})
    assert main(["analyze", "weights", "--model", str(llama_checkpoint), "--checkpoints", str(later),
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    manifest = check_folder(folder, "weights")
    assert {f["name"] for f in manifest["figures"]} == {"singular_values", "weights_by_layer", "checkpoint_comparison"}
    table = json.loads((folder / "matrices.json").read_text())["matrices"]
    assert {row["name"] for row in table} >= {"lm_head", "model.embed_tokens", "model.layers.2.self_attn.o_proj"}
    comparison = json.loads((folder / "checkpoint_comparison.json").read_text())
    assert comparison["change_points"]["model.layers.0.mlp.up_proj"]["relative_change"]["largest_jump_at"] == 1
    assert "model.layers.0.mlp.up_proj" in (folder / "report.md").read_text()


def test_bad_requests_exit_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["analyze", "circuits", "--model", "default", "--out", str(tmp_path), "--quiet"]
    assert main(base + ["--prompt", CLEAN, "--target", "definitely not one token"]) == 2
    assert "not one token" in capsys.readouterr().err
    assert main(base + ["--prompt", CLEAN, "--corrupted", "x = 1"]) == 2
    assert "same number of tokens" in capsys.readouterr().err
    assert main(base + ["--prompt", CLEAN, "--position", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # a refused request writes nothing
