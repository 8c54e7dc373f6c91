"""SAE training on a tiny activation store of the embedded default model: every architecture,
transcoders, held-out metrics and CE loss recovered, resume after a real kill, feature pages.

Resume: `mlx-engine sae train` runs in a subprocess and is killed with SIGKILL as soon as its
first checkpoint is on disk; the same call, run again, ends with weights and logged history
bit-identical (np.array_equal) to an uninterrupted run with the same seed. Pages: the top
examples, histograms and logit effects equal a brute-force pass (values within 1e-5 relative).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np
import pytest

from mlx_engine.sae import feature_pages, load_sae, reconstruction_metrics, train
from mlx_engine.store.errors import StoreError

WORDS = "river stone market winter garden engine letter doctor candle silver harbor forest pencil thunder".split()
TEXTS = [f"The {WORDS[i % 14]} near the {WORDS[(3 * i) % 14]} was {['quiet', 'loud', 'old', 'new'][i % 4]}, "
         f"said the {WORDS[(5 * i + 2) % 14]} to the {WORDS[(7 * i + 1) % 14]} on day {i}." for i in range(70)]
HOOKS = ["layers.1.residual", "layers.1.resid_mid", "layers.1.mlp"]
SMALL = {"batch_size": 128, "shuffle_block": 256, "eval_tokens": 256, "eval_windows": 6}


@pytest.fixture(scope="module")
def kit():
    return mlx_engine.load_model("default")


@pytest.fixture(scope="module")
def store(kit, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("store") / "default"
    return mlx_engine.extract(kit, TEXTS, HOOKS, out, context_size=32, batch_size=8, shard_tokens=300, progress=False)


@pytest.fixture(scope="module")
def topk(kit, store, tmp_path_factory: pytest.TempPathFactory):
    return train(store, "layers.1.residual", 512, tmp_path_factory.mktemp("topk") / "sae", architecture="topk", k=16,
                 tokens=120 * 128, lr=1e-3, model=kit, progress=False, **SMALL)


def test_topk_on_a_store_with_metrics_and_ce(store, topk) -> None:
    m = topk.metrics
    assert topk.sae.cfg.hook_name == "blocks.1.hook_resid_post" and topk.sae.cfg.model_name == "default"
    assert topk.sae.cfg.context_size == 32 and topk.sae.cfg.metadata["mlx_engine"]["hook_id"] == "layers.1.residual"
    assert m["heldout_tokens"] >= 256 and m["heldout_l0"] == pytest.approx(16.0) and m["heldout_fve"] > 0.5
    assert 0 <= m["heldout_dead_fraction"] <= 1 and 0 <= m["heldout_dense_fraction"] <= 1
    # (the spliced model may come out a hair below the clean CE: the reconstruction explains 98% of the variance)
    assert m["ce_clean"] < m["ce_zero_ablation"] and m["ce_sae"] < m["ce_zero_ablation"] and m["ce_loss_recovered"] > 0.5
    assert m["ce_loss_recovered"] == pytest.approx((m["ce_zero_ablation"] - m["ce_sae"]) / (m["ce_zero_ablation"] - m["ce_clean"]))
    record = json.loads((topk.path / "training.json").read_text())
    assert record["status"] == "complete" and not (topk.path / "checkpoint.safetensors").exists()
    # the held-out metrics are reconstruction_metrics over the rows after the split
    n = store.num_tokens
    held = np.asarray(store.rows("layers.1.residual")[n - m["heldout_tokens"] : n])
    again = reconstruction_metrics(topk.sae, held)
    assert again["fve"] == pytest.approx(m["heldout_fve"]) and again["mse"] == pytest.approx(m["heldout_mse"])


@pytest.mark.parametrize("arch, extra", [("relu", {"l1": 1.0, "resample_every": 20}), ("batchtopk", {"k": 16}), ("jumprelu", {"l1": 0.1})])
def test_every_architecture_trains_on_the_store(store, tmp_path: Path, arch: str, extra: dict) -> None:
    result = train(store, "layers.1.residual", 256, tmp_path / arch, architecture=arch, tokens=60 * 128, lr=1e-3,
                   eval_ce=False, progress=False, log_every=10, **SMALL, **extra)
    assert result.sae.cfg.file_architecture == {"relu": "standard"}.get(arch, "jumprelu")
    assert result.metrics["heldout_fve"] > 0.2, result.metrics
    assert [h["step"] for h in result.history] == list(range(10, 61, 10))
    assert np.allclose(np.linalg.norm(result.sae.numpy()["W_dec"], axis=1), 1, atol=1e-5)
    assert load_sae(result.path).cfg == result.sae.cfg


def test_transcoder_from_resid_mid_to_mlp(kit, store, tmp_path: Path) -> None:
    result = train(store, "layers.1.resid_mid", 256, tmp_path / "tc", target_hook="layers.1.mlp", architecture="topk", k=16,
                   tokens=80 * 128, lr=1e-3, model=kit, progress=False, **SMALL)
    cfg = result.sae.cfg
    assert cfg.transcoder and cfg.file_architecture == "topk_transcoder" and not cfg.apply_b_dec_to_input
    assert (cfg.hook_name, cfg.hook_name_out) == ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    assert result.metrics["heldout_fve"] > 0.2 and result.metrics["ce_sae"] < result.metrics["ce_zero_ablation"]


def test_resume_after_a_kill_matches_an_uninterrupted_run(store, tmp_path: Path) -> None:
    args = {"architecture": "relu", "l1": 1.0, "resample_every": 40, "tokens": 400 * 128, "batch_size": 128, "shuffle_block": 256,
            "eval_tokens": 256, "seed": 3, "log_every": 25, "lr": 1e-3}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mlx_engine.cli", "sae", "train", "--store", str(store.path), "--hook", "layers.1.residual",
           "--d-sae", "256", "--arch", "relu", "--l1", "1.0", "--resample-every", "40", "--tokens", str(400 * 128),
           "--batch-size", "128", "--shuffle-block", "256", "--eval-tokens", "256", "--seed", "3", "--log-every", "25",
           "--lr", "1e-3", "--checkpoint-every", "30", "--no-eval-ce", "--no-progress", "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.time() + 90
    while not (killed / "checkpoint.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    assert (killed / "checkpoint.safetensors").exists() and not (killed / "cfg.json").exists()
    resumed = train(store, "layers.1.residual", 256, killed, eval_ce=False, progress=False, checkpoint_every=30, **args)
    whole = train(store, "layers.1.residual", 256, tmp_path / "whole", eval_ce=False, progress=False, checkpoint_every=1000, **args)
    assert resumed.history == whole.history and len(whole.history) == 16
    for name, value in whole.sae.numpy().items():
        assert np.array_equal(resumed.sae.numpy()[name], value), name
    assert resumed.metrics["heldout_fve"] == whole.metrics["heldout_fve"]


def test_bad_store_input_gets_a_clear_error(store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(StoreError, match=r"Hook 'layers.2.residual' is not in the store .*; it holds layers.1.residual, layers.1.resid_mid, layers.1.mlp"):
        train(store, "layers.2.residual", 64, tmp_path / "x", progress=False)
    from mlx_engine.cli import main

    assert main(["sae", "train", "--store", str(tmp_path), "--hook", "h", "--d-sae", "8", "--out", str(tmp_path / "y")]) == 2
    assert "is not an activation store" in capsys.readouterr().err
    assert main(["sae", "train", "--store", str(store.path), "--hook", "layers.9.mlp", "--d-sae", "8", "--out", str(tmp_path / "z")]) == 2
    assert "Hook 'layers.9.mlp' is not in the store" in capsys.readouterr().err


def test_feature_pages_equal_a_brute_force_pass(kit, store, topk) -> None:
    sae = topk.sae
    rows = np.asarray(store.rows("layers.1.residual"))
    acts = np.array(sae.encode(mx.array(rows)))
    alive = np.nonzero((acts > 0).any(axis=0))[0]
    features = [int(alive[0]), int(alive[len(alive) // 2]), int(np.argmax((acts > 0).sum(axis=0)))]
    pages = feature_pages(sae, store, kit, features=features, top_k=5, context=4, bins=10, logit_k=5, batch_size=500)
    assert pages["hook"] == "layers.1.residual" and pages["tokens"] == len(rows)
    docs = np.asarray(store.index()[0])
    tokens = np.asarray(store.tokens())
    from mlx_engine.analysis.unembed import unembedding

    logits = np.array(unembedding(kit).head(sae.W_dec[mx.array(features)]))
    for page, j, lg in zip(pages["features"], features, logits):
        col = acts[:, j]
        best = -np.sort(-col)[:5]
        best = best[best > 0]
        # the 5 largest values (rows tied to within float32 rounding, e.g. repeated first tokens, may swap)
        got = np.array([e["maxValue"] for e in page["activations"]])
        assert len(got) == len(best) and np.allclose(got, best, rtol=1e-5)
        assert np.allclose(col[[e["row"] for e in page["activations"]]], got, rtol=1e-5)
        assert page["frac_nonzero"] == pytest.approx((col > 0).mean()) and page["maxActApprox"] == pytest.approx(col.max(), rel=1e-5)
        assert sum(page["freq_hist_data_bar_heights"]) == int((col > 0).sum())
        expected_hist = np.histogram(col[col > 0], bins=10, range=(0, col.max()))[0]
        assert np.abs(np.array(page["freq_hist_data_bar_heights"]) - expected_hist).sum() <= 2  # bin edges in float32 vs float64
        for ex in page["activations"]:
            window = [r for r in range(ex["row"] - 4, ex["row"] + 5) if 0 <= r < len(rows) and docs[r] == docs[ex["row"]]]
            assert ex["token_ids"] == tokens[window].tolist() and ex["tokens"] == [kit.tokenizer.decode([t]) for t in tokens[window]]
            assert np.allclose(ex["values"], col[window], rtol=1e-5, atol=1e-6)
            assert ex["values"][ex["maxValueTokenIndex"]] == pytest.approx(ex["maxValue"], rel=1e-5)
        assert page["pos_ids"] == np.argsort(-lg, kind="stable")[:5].tolist() and page["neg_ids"] == np.argsort(lg, kind="stable")[:5].tolist()
        assert page["pos_values"] == pytest.approx(lg[page["pos_ids"]].tolist(), rel=1e-5)
