"""Weight statistics equal numpy's on the dequantized matrices, the 4-bit default model and its
dequantized float copy give the same tables, and a change between checkpoints is found where it is.

The float copy is written here: every quantized layer's weight through mx.dequantize (as
test_hooks_equivalence.py does), saved without the quantization config, loaded as a float
model. Its weights are exactly the 4-bit model's effective weights, so the tables differ only by
the arithmetic of quantized versus dense matmuls: QUANT_ATOL on probabilities, KL and logit terms.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

import mlx_engine
from mlx_engine.analysis.attribution import direct_logit_attribution
from mlx_engine.analysis.common import AnalysisError
from mlx_engine.analysis.heads import head_scores
from mlx_engine.analysis.lens import logit_lens
from mlx_engine.analysis.weights import matrix_stats, weight_report
from mlx_engine.analysis.weights_compare import change_point, compare_checkpoints

QUANT_ATOL = 5e-5  # quantized vs dense matmul on identical weights (float32): measured <= 1e-5 on O(1) quantities
STATS_RTOL = 1e-6  # weight statistics of identical float32 matrices (float64 maths)
PROMPT = "def encode(self, obj):\n    return json.dumps(obj)"
SOME = r"lm_head|embed_tokens|layers\.0\.|layers\.3\.mlp\.experts\.down_proj"  # keeps the SVDs few


def float_copy(kit, out: Path) -> Path:
    """The model's weights dequantized into a float32 checkpoint folder."""
    out.mkdir()
    weights: dict[str, np.ndarray] = {}
    quantized = {path for path, module in kit.model.named_modules() if "scales" in module}
    for path in quantized:
        module = dict(kit.model.named_modules())[path]
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits, mode=module.mode)
        weights[f"{path}.weight"] = np.array(w.astype(mx.float32))
    for name, value in tree_flatten(kit.model.parameters()):
        owner, leaf = name.rsplit(".", 1)
        if owner in quantized and leaf in ("weight", "scales", "biases"):
            continue
        weights[name] = np.array(value.astype(mx.float32))
    save_file(weights, str(out / "model.safetensors"))
    config = json.loads((kit.path / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    for f in kit.path.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith((".jinja", "generation_config.json")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def default_kit():
    return mlx_engine.load_model("default")


@pytest.fixture(scope="module")
def float_kit(default_kit, tmp_path_factory: pytest.TempPathFactory):
    kit = mlx_engine.load_model(float_copy(default_kit, tmp_path_factory.mktemp("float") / "default-float32"))
    assert not any("scales" in m for _, m in kit.model.named_modules())
    return kit


def test_spectra_and_ranks_equal_numpy_on_the_dequantized_matrices(default_kit) -> None:
    report = weight_report(default_kit, include=SOME).by_name()
    modules = dict(default_kit.model.named_modules())
    for name, index in (("lm_head", None), ("model.layers.0.self_attn.k_proj", None), ("model.layers.3.mlp.experts.down_proj", 5)):
        m = modules[name]
        w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode)
        w = np.array(w.astype(mx.float32), dtype=np.float64)
        if index is not None:
            w, name = w[index], f"{name}[{index}]"
        stats = report[name]
        s = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(stats.singular_values, s, rtol=1e-10)
        p = s / s.sum()
        assert stats.values["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-10)
        assert stats.values["stable_rank"] == pytest.approx(np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2, rel=1e-10)
        assert stats.values["std"] == pytest.approx(w.std(), rel=1e-12)
        assert stats.values["zero_fraction"] == pytest.approx(np.mean(w == 0))
        assert stats.shape == w.shape and stats.storage.startswith(("4-bit", "8-bit"))
    assert report["model.layers.0.mlp.router"].storage.startswith("8-bit")


def test_ranks_of_known_matrices() -> None:
    rng = np.random.default_rng(0)
    low = rng.standard_normal((64, 3)) @ rng.standard_normal((3, 48))  # rank 3
    stats = matrix_stats("x", low)
    assert np.sum(stats.singular_values > 1e-9 * stats.singular_values[0]) == 3
    assert 1.0 <= stats.values["effective_rank"] <= 3.0 + 1e-9 and 1.0 <= stats.values["stable_rank"] <= 3.0
    eye = matrix_stats("eye", np.eye(16))
    assert eye.values["effective_rank"] == pytest.approx(16) and eye.values["stable_rank"] == pytest.approx(16)
    assert eye.values["zero_fraction"] == pytest.approx(1 - 1 / 16)
    spiky = np.zeros((40, 40)) + rng.normal(0, 0.01, (40, 40))
    spiky[3, 7] = 1.0
    assert matrix_stats("spiky", spiky).values["outlier_fraction"] == pytest.approx(1 / 1600)


def test_quantized_and_float_copy_give_the_same_tables(default_kit, float_kit) -> None:
    q, f = weight_report(default_kit, include=SOME), weight_report(float_kit, include=SOME)
    assert [m.name for m in q.matrices] == [m.name for m in f.matrices]
    for a, b in zip(q.matrices, f.matrices):
        for key, value in a.values.items():
            assert b.values[key] == pytest.approx(value, rel=STATS_RTOL, abs=1e-9), (a.name, key)
    assert {m.storage for m in f.matrices} == {"float32"}

    lq, lf = logit_lens(default_kit, PROMPT), logit_lens(float_kit, PROMPT)
    np.testing.assert_allclose(lq.next_prob, lf.next_prob, atol=QUANT_ATOL)
    np.testing.assert_allclose(lq.top_probs, lf.top_probs, atol=QUANT_ATOL)
    np.testing.assert_allclose(lq.kl_to_final, lf.kl_to_final, atol=QUANT_ATOL)
    assert np.array_equal(lq.top_ids[..., 0], lf.top_ids[..., 0]) and np.array_equal(lq.next_rank, lf.next_rank)

    aq, af = direct_logit_attribution(default_kit, PROMPT, 11, 12), direct_logit_attribution(float_kit, PROMPT, 11, 12)
    assert af.total == pytest.approx(aq.total, abs=QUANT_ATOL)
    np.testing.assert_allclose(af.heads, aq.heads, atol=QUANT_ATOL)
    np.testing.assert_allclose(af.mlp, aq.mlp, atol=QUANT_ATOL)

    hq = head_scores(default_kit, PROMPT, repeat_length=10, progress=False)
    hf = head_scores(float_kit, PROMPT, repeat_length=10, progress=False)
    for metric, table in hq.tables.items():
        np.testing.assert_allclose(hf.tables[metric], table, atol=QUANT_ATOL, err_msg=metric)


def test_change_point_methods() -> None:
    step = change_point([1.0, 1.0, 1.1, 5.0, 5.1, 5.0])
    assert step.largest_jump_at == 3 and step.split_at == 3 and step.mean_shift == pytest.approx(5.0333 - 1.0333, abs=1e-3)
    assert step.explained > 0.99
    flat = change_point([2.0, 2.0, 2.0])
    assert flat.split_at is None and flat.largest_jump == 0.0
    with pytest.raises(AnalysisError, match="at least two"):
        change_point([1.0])


def test_a_scaled_matrix_is_found_where_the_checkpoints_change(llama_checkpoint: Path, tmp_path: Path) -> None:
    """Checkpoints 0..3; from 2 on, one matrix is 3 times larger: its change point is at 2, every other matrix is unchanged."""
    key = "model.layers.1.self_attn.v_proj.weight"
    folders = []
    for k in range(4):
        folder = tmp_path / f"step{k}"
        shutil.copytree(llama_checkpoint, folder)
        if k >= 2:
            weights = load_file(str(folder / "model.safetensors"))
            weights[key] = weights[key] * 3.0
            save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    comparison = compare_checkpoints(folders, progress=False)
    name = key.removesuffix(".weight")
    assert comparison.relative_change[name] == [None, 0.0, pytest.approx(2.0, rel=1e-6), 0.0]
    cps = comparison.change_points[name]
    assert cps["frobenius_norm"].split_at == 2 and cps["frobenius_norm"].largest_jump_at == 2
    assert cps["relative_change"].largest_jump_at == 2
    assert cps["stable_rank"].split_at is None  # scaling does not change a rank
    assert comparison.ranked()[0]["matrix"] == name
    others = [m for m in comparison.matrices if m != name]
    assert others and all(comparison.change_points[m]["relative_change"].largest_jump == 0.0 for m in others)
    assert json.loads(json.dumps(comparison.to_json()))["checkpoints"] == [str(f) for f in folders]
    with pytest.raises(AnalysisError, match="at least two"):
        compare_checkpoints(folders[:1])
