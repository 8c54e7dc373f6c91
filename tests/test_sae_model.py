"""SAEs without a model: each architecture's forward against a hand-written numpy forward, the
SAELens-format round trip, Gemma Scope files and Hub ids (offline, from a local cache), the
training objective's pieces, a planted dictionary recovered by TopK training, and bad input.

Tolerances: MLX float32 against numpy float64, |mlx - numpy| <= 1e-4 * (1 + |numpy|) (sums of
up to 64 products); round trips are exact (np.array_equal on every tensor, equal configs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx_engine  # noqa: F401,I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np
import pytest

from mlx_engine.sae import SAE, SAEConfig, SAEError, load_sae, save_sae, train
from mlx_engine.sae.formats import config_from_dict
from mlx_engine.sae.initial import geometric_median
from mlx_engine.sae.objectives import batch_top_k, jumprelu_functions

D_IN, D_SAE = 24, 40
TOL = 1e-4


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.all(np.abs(np.asarray(got, np.float64) - want) <= TOL * (1 + np.abs(want))))


def random_sae(arch: str, rng: np.random.Generator, *, transcoder: bool = False, **cfg: object) -> SAE:
    d_out = 16 if transcoder else D_IN
    arrays = {
        "W_enc": rng.standard_normal((D_IN, D_SAE)).astype(np.float32) / 4,
        "W_dec": rng.standard_normal((D_SAE, d_out)).astype(np.float32) / 4,
        "b_enc": rng.standard_normal(D_SAE).astype(np.float32) / 4,
        "b_dec": rng.standard_normal(d_out).astype(np.float32) / 4,
    }
    if arch == "jumprelu":
        arrays["threshold"] = rng.uniform(0.0, 0.5, D_SAE).astype(np.float32)
    config = SAEConfig(arch, d_in=D_IN, d_sae=D_SAE, d_out=d_out, transcoder=transcoder, hook_name="blocks.1.hook_resid_post",
                       apply_b_dec_to_input=not transcoder, **cfg)
    return SAE(config, arrays)


def numpy_forward(sae: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens's equations written out in numpy float64: (features, reconstruction)."""
    p = {k: v.astype(np.float64) for k, v in sae.numpy().items()}
    c = sae.cfg
    x = x.astype(np.float64)
    scale, shift = 1.0, 0.0
    if c.normalize_activations == "constant_norm_rescale":
        coeff = np.sqrt(c.d_in) / np.linalg.norm(x, axis=-1, keepdims=True)
        x, scale = x * coeff, 1 / coeff
    elif c.normalize_activations == "layer_norm":
        shift = x.mean(-1, keepdims=True)
        scale = x.std(-1, ddof=1, keepdims=True)
        x = (x - shift) / (scale + 1e-5)
    sae_in = x - p["b_dec"] if c.apply_b_dec_to_input else x
    pre = sae_in @ p["W_enc"] + p["b_enc"]
    norms = np.linalg.norm(p["W_dec"], axis=1)
    if c.architecture == "topk":
        if c.rescale_acts_by_decoder_norm:
            pre = pre * norms
        f = np.zeros_like(pre)
        top = np.argsort(-pre, axis=-1)[:, : c.k]
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    elif c.architecture == "jumprelu":
        f = np.maximum(pre, 0) * (pre > p["threshold"])
    else:
        f = np.maximum(pre, 0)
    g = f / norms if c.architecture == "topk" and c.rescale_acts_by_decoder_norm else f
    out = (g @ p["W_dec"] + p["b_dec"]) * scale + (shift if c.normalize_activations == "layer_norm" else 0.0)
    return f, out


CASES = [
    ("standard", {}, False), ("topk", {"k": 5}, False), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}, False),
    ("jumprelu", {}, False), ("standard", {"normalize_activations": "layer_norm"}, False),
    ("topk", {"k": 7, "normalize_activations": "constant_norm_rescale"}, False),
    ("standard", {}, True), ("jumprelu", {}, True), ("topk", {"k": 3}, True),
]


@pytest.mark.parametrize("arch, cfg, transcoder", CASES)
def test_forward_equals_numpy(arch: str, cfg: dict, transcoder: bool) -> None:
    rng = np.random.default_rng(len(arch) + len(cfg))
    sae = random_sae(arch, rng, transcoder=transcoder, **cfg)
    x = rng.standard_normal((33, D_IN)).astype(np.float32) * 2
    f_ref, out_ref = numpy_forward(sae, x)
    f, state = sae.encode_with_state(mx.array(x))
    assert close(np.array(f), f_ref)
    assert close(np.array(sae.decode(f, state)), out_ref) and close(np.array(sae(mx.array(x))), out_ref)
    if arch == "topk":
        assert (np.array(f) > 0).sum(axis=1).max() <= cfg["k"]
    # delta: decode(f + df) - decode(f) through the decoder alone
    df = np.zeros(f.shape, np.float32)
    df[:, 3] = 1.5
    moved = np.array(sae.decode(f + mx.array(df), state)) - np.array(sae.decode(f, state))
    assert np.allclose(np.array(sae.delta(mx.array(df), state)), moved, atol=1e-4)


@pytest.mark.parametrize("arch, cfg, transcoder", CASES)
def test_save_load_round_trips_exactly(tmp_path: Path, arch: str, cfg: dict, transcoder: bool) -> None:
    sae = random_sae(arch, np.random.default_rng(3), transcoder=transcoder, **cfg)
    sae.cfg.metadata["note"] = {"kept": [1, 2]}
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.cfg == sae.cfg
    assert set(loaded.arrays()) == set(sae.arrays())
    assert all(np.array_equal(np.array(loaded.arrays()[k]), np.array(v)) for k, v in sae.arrays().items())
    written = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert written["architecture"] == sae.cfg.file_architecture and written["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert written["metadata"]["sae_lens_version"].startswith("6")
    again = save_sae(loaded, tmp_path / "again")
    assert (again / "cfg.json").read_text() == (tmp_path / "sae" / "cfg.json").read_text()


def test_pre_6_saelens_config_and_gemma_scope_params(tmp_path: Path) -> None:
    legacy = config_from_dict({"d_in": 8, "d_sae": 16, "hook_point": "blocks.3.hook_resid_pre", "activation_fn_str": "topk",
                               "activation_fn_kwargs": {"k": 4}, "normalize_activations": False, "context_size": 128})
    assert (legacy.architecture, legacy.k, legacy.hook_name, legacy.context_size) == ("topk", 4, "blocks.3.hook_resid_pre", 128)
    assert legacy.normalize_activations == "none"
    rng = np.random.default_rng(5)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_40"
    folder.mkdir(parents=True)
    params = {"W_enc": rng.standard_normal((D_IN, D_SAE)), "W_dec": rng.standard_normal((D_SAE, D_IN)),
              "b_enc": rng.standard_normal(D_SAE), "b_dec": rng.standard_normal(D_IN), "threshold": rng.uniform(0, 1, D_SAE)}
    np.savez(folder / "params.npz", **params)
    sae = load_sae(folder)
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.apply_b_dec_to_input) == ("jumprelu", "blocks.7.hook_resid_post", False)
    x = rng.standard_normal((9, D_IN))
    pre = x @ params["W_enc"] + params["b_enc"]  # Gemma Scope's own reference: no b_dec on the input
    want = np.maximum(pre, 0) * (pre > params["threshold"])
    assert close(np.array(sae.encode(mx.array(x.astype(np.float32)))), want)


def test_hub_repo_id_loads_from_the_local_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE set (no network)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-saes" / "snapshots" / ("0" * 40)
    sae = random_sae("topk", np.random.default_rng(8), k=4)
    save_sae(sae, snapshot / "blocks.1.hook_resid_post")
    (cache / "models--someone--tiny-saes" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-saes" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    loaded = load_sae("someone/tiny-saes/blocks.1.hook_resid_post")
    assert all(np.array_equal(np.array(loaded.arrays()[k]), np.array(v)) for k, v in sae.arrays().items())
    assert load_sae("someone/tiny-saes", folder="blocks.1.hook_resid_post").cfg == loaded.cfg
    with pytest.raises(SAEError, match="not in the local Hugging Face cache"):
        load_sae("someone/absent-saes")


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="Unknown SAE architecture 'gated'; supported: standard, topk, jumprelu"):
        config_from_dict({"architecture": "gated", "d_in": 4, "d_sae": 8, "metadata": {"sae_lens_version": "6.1.0"}})
    with pytest.raises(SAEError, match="Unknown architecture 'sparse'; choose one of relu, topk, batchtopk, jumprelu"):
        train(np.zeros((64, 4), np.float32), "x", 8, tmp_path / "t", architecture="sparse")
    sae = random_sae("standard", np.random.default_rng(0))
    with pytest.raises(SAEError, match=r"width 23 cannot be encoded: this SAE \(blocks.1.hook_resid_post\) reads d_in=24"):
        sae.encode(mx.zeros((2, 23)))
    arrays = sae.numpy()
    arrays["W_dec"] = arrays["W_dec"][:, :20]
    with pytest.raises(SAEError, match=r"W_dec has shape \[40, 20\] but the config .* needs \[40, 24\]"):
        SAE(sae.cfg, arrays)
    with pytest.raises(SAEError, match="unknown training option"):
        train(np.zeros((64, 4), np.float32), "x", 8, tmp_path / "u", learning_rate=1e-3)
    with pytest.raises(SAEError, match="k applies to topk and batchtopk"):
        train(np.zeros((64, 4), np.float32), "x", 8, tmp_path / "v", architecture="relu", k=3)
    with pytest.raises(SAEError, match="neither cfg.json"):
        load_sae(tmp_path)


def test_objective_pieces() -> None:
    """Weiszfeld's median minimises the summed distance; BatchTopK keeps k * B; JumpReLU's STE gradients."""
    rng = np.random.default_rng(2)
    pts = np.concatenate([rng.standard_normal((200, 3)), rng.standard_normal((20, 3)) * 30 + 50])
    med = geometric_median(pts)
    cost = lambda y: np.linalg.norm(pts - y, axis=1).sum()  # noqa: E731
    assert all(cost(med) <= cost(med + d) for d in np.eye(3) * 1e-3) and cost(med) < cost(pts.mean(0))
    acts = mx.array(np.abs(rng.standard_normal((6, 10))).astype(np.float32))
    kept = np.array(batch_top_k(acts, 2))
    assert (kept > 0).sum() == 12 and np.array_equal(np.sort(kept[kept > 0]), np.sort(np.array(acts).ravel())[-12:])
    eps = 0.5
    jump, step = jumprelu_functions(eps)
    z = mx.array([[0.1, 0.6, 1.0], [0.4, 0.2, 2.0]])
    theta = mx.array([0.5, 0.5, 0.5])
    dz, dtheta = mx.grad(lambda a, b: jump(a, b).sum(), argnums=(0, 1))(z, theta)
    rect = (np.abs((np.array(z) - 0.5) / eps) < 0.5).astype(np.float32)
    assert np.array_equal(np.array(dz), (np.array(z) > 0.5).astype(np.float32))
    assert np.allclose(np.array(dtheta), -(0.5 / eps) * rect.sum(0))
    _, dtheta_step = mx.grad(lambda a, b: step(a, b).sum(), argnums=(0, 1))(z, theta)
    assert np.allclose(np.array(dtheta_step), -(1 / eps) * rect.sum(0))


def test_topk_recovers_a_planted_dictionary(tmp_path: Path) -> None:
    """Sparse combinations (4 of 96 unit directions, weights in [0.5, 2]) plus noise 0.01: most
    directions have a decoder row at cosine > 0.95."""
    rng = np.random.default_rng(1)
    d, n_dirs, n = 48, 96, 40000
    dirs = rng.standard_normal((n_dirs, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    codes = np.zeros((n, n_dirs))
    picks = np.argsort(rng.random((n, n_dirs)), axis=1)[:, :4]
    np.put_along_axis(codes, picks, rng.uniform(0.5, 2.0, (n, 4)), axis=1)
    x = (codes @ dirs + 0.01 * rng.standard_normal((n, d))).astype(np.float32)
    result = train(x, "planted", 192, tmp_path / "planted", architecture="topk", k=4, batch_size=512, tokens=300 * 512,
                   lr=3e-3, progress=False, eval_tokens=2048)
    w = result.sae.numpy()["W_dec"]
    assert np.allclose(np.linalg.norm(w, axis=1), 1, atol=1e-5)  # unit-norm decoder rows in the saved SAE
    best = (dirs @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(axis=1)
    assert (best > 0.95).mean() >= 0.9, np.sort(best)[:10]
    assert result.metrics["heldout_fve"] > 0.9 and result.metrics["heldout_l0"] == pytest.approx(4.0)
    assert result.history and {"loss", "mse", "fve", "l0", "dead_fraction", "lr"} <= set(result.history[-1])
    assert load_sae(result.path).cfg == result.sae.cfg
