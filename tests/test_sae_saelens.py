"""SAELens itself as the reference: files written here open in SAELens with equal encodings, and files
written by SAELens (its own save_model / save_inference_model) open here with equal encodings.

Tolerance: MLX float32 against torch float32, |ours - SAELens| <= 1e-5 * (1 + |SAELens|).
Skipped, with the reason, where sae-lens cannot be imported (`pip install sae-lens`, the test extra).
"""

from __future__ import annotations

from pathlib import Path

import mlx_engine  # noqa: F401,I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np
import pytest

from mlx_engine.sae import SAE, SAEConfig, load_sae, save_sae, train

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install sae-lens: the test extra)")
torch = pytest.importorskip("torch")

D_IN, D_SAE = 16, 48
TOL = 1e-5


def same(ours: np.ndarray, theirs: np.ndarray) -> bool:
    return bool(np.all(np.abs(ours - theirs) <= TOL * (1 + np.abs(theirs))))


def inputs(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((40, D_IN)) * 3).astype(np.float32)


def theirs_encode(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sae = sae_lens.SAE.load_from_disk(str(path))
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x))
        return f.numpy(), sae.decode(f).numpy()


def ours_encode(sae: SAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = sae.encode(mx.array(x))
    return np.array(f), np.array(sae.decode(f))


def random_weights(rng: np.random.Generator, d_out: int = D_IN, threshold: bool = False) -> dict[str, np.ndarray]:
    out = {"W_enc": rng.standard_normal((D_IN, D_SAE)) / 3, "W_dec": rng.standard_normal((D_SAE, d_out)) / 3,
           "b_enc": rng.standard_normal(D_SAE) / 3, "b_dec": rng.standard_normal(d_out) / 3}
    if threshold:
        out["threshold"] = rng.uniform(0, 0.6, D_SAE)
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.mark.parametrize("arch, extra", [("standard", {}), ("topk", {"k": 6}), ("jumprelu", {}),
                                         ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True})])
def test_our_files_open_in_saelens(tmp_path: Path, arch: str, extra: dict) -> None:
    rng = np.random.default_rng(len(arch))
    sae = SAE(SAEConfig(arch, d_in=D_IN, d_sae=D_SAE, hook_name="blocks.2.hook_resid_post", context_size=64, **extra),
              random_weights(rng, threshold=arch == "jumprelu"))
    path = save_sae(sae, tmp_path / arch)
    loaded = sae_lens.SAE.load_from_disk(str(path))
    assert loaded.cfg.architecture() == arch and loaded.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    x = inputs()
    (f, out), (f_ref, out_ref) = ours_encode(sae, x), theirs_encode(path, x)
    assert same(f, f_ref) and same(out, out_ref)


def test_our_transcoder_opens_in_saelens(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    cfg = SAEConfig("standard", d_in=D_IN, d_sae=D_SAE, d_out=12, transcoder=True, apply_b_dec_to_input=False,
                    hook_name="blocks.1.hook_resid_mid", hook_name_out="blocks.1.hook_mlp_out")
    sae = SAE(cfg, random_weights(rng, d_out=12))
    path = save_sae(sae, tmp_path / "tc")
    x = inputs(1)
    (f, out), (f_ref, out_ref) = ours_encode(sae, x), theirs_encode(path, x)
    assert out.shape == (40, 12) and same(f, f_ref) and same(out, out_ref)


@pytest.mark.parametrize("name", ["StandardSAE", "TopKSAE", "JumpReLUSAE"])
def test_saelens_files_open_here(tmp_path: Path, name: str) -> None:
    cls = getattr(sae_lens, name)
    extra = {"k": 5} if name == "TopKSAE" else {}
    cfg = getattr(sae_lens, f"{name}Config")(d_in=D_IN, d_sae=D_SAE, metadata=sae_lens.saes.sae.SAEMetadata(hook_name="blocks.0.hook_mlp_out"), **extra)
    theirs = cls(cfg)
    with torch.no_grad():  # SAELens initialises b_enc (and the threshold) at 0: give every weight a value
        for param in theirs.parameters():
            param.copy_(torch.randn_like(param) / 3)
        if name == "JumpReLUSAE":
            theirs.threshold.copy_(torch.rand_like(theirs.threshold) * 0.5)
    theirs.save_model(str(tmp_path / name))
    ours = load_sae(tmp_path / name)
    assert ours.cfg.hook_name == "blocks.0.hook_mlp_out" and ours.cfg.file_architecture == cfg.architecture()
    x = inputs(2)
    (f, out), (f_ref, out_ref) = ours_encode(ours, x), theirs_encode(tmp_path / name, x)
    assert same(f, f_ref) and same(out, out_ref)


def test_a_trained_batchtopk_opens_in_saelens_as_jumprelu(tmp_path: Path) -> None:
    """BatchTopK is saved as JumpReLU with its threshold (SAELens's convention); SAELens agrees on it."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((4096, D_IN)) @ rng.standard_normal((D_IN, D_IN))).astype(np.float32)
    result = train(x, "blocks.0.hook_resid_post", D_SAE, tmp_path / "btk", architecture="batchtopk", k=4, batch_size=256,
                   tokens=60 * 256, progress=False, eval_tokens=512)
    assert result.sae.cfg.file_architecture == "jumprelu"
    held = x[-512:]
    (f, out), (f_ref, out_ref) = ours_encode(result.sae, held), theirs_encode(result.path, held)
    assert same(f, f_ref) and same(out, out_ref)
    assert 1.0 < (f > 0).sum(axis=1).mean() < 12.0  # the threshold keeps about k per token
