"""An SAE attached to the embedded default model: its features as a hook point.

What is proven, on an SAE trained here on the model's own layer-1 residuals:
  - attached and unedited, it changes nothing: streamed tokens, logprobs, logits and downstream
    captures are bit-identical (np.array_equal) to the run without it;
  - its `sae_features` captures (dense, and top-k ids with values) equal `sae.encode` of the
    same step's captured residual (|diff| <= 1e-5 * (1 + |value|): the same float32 maths,
    blocked differently by BLAS);
  - clamping / ablating / adding to a feature changes every downstream residual exactly as an
    `add` intervention of the corresponding decoder delta at the site (bit-identical);
  - per-head sites (z, SAELens's hook_z layout) work the same way;
  - it is listed, named in every accepted form, and bad requests get clear errors.
"""

from __future__ import annotations

from pathlib import Path

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import mlx.core as mx
import numpy as np
import pytest

from mlx_engine.hooks.names import HookSpecError
from mlx_engine.sae import SAE, SAEConfig, SAEError, attached_saes, detach_sae, train

TEXTS = [f"Sentence {i}: the {w} sat on the mat while {v} ran past the old stone wall." for i, (w, v) in
         enumerate([("cat", "a dog"), ("owl", "the fox"), ("king", "his horse"), ("robot", "a child"), ("crow", "rain")] * 6)]
PROMPT = "Once upon a time the little robot"


@pytest.fixture(scope="module")
def kit():
    return mlx_engine.load_model("default")


@pytest.fixture(scope="module")
def sae(kit, tmp_path_factory: pytest.TempPathFactory) -> SAE:
    rows = np.concatenate([np.array(mlx_engine.run_with_cache(kit, t, ["layers.1.residual"])["layers.1.residual"]) for t in TEXTS])
    out = tmp_path_factory.mktemp("sae") / "resid1"
    return train(rows, "blocks.1.hook_resid_post", 512, out, architecture="topk", k=16, batch_size=128, tokens=150 * 128,
                 lr=1e-3, progress=False, eval_tokens=128).sae


def close(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.all(np.abs(got - want) <= 1e-5 * (1 + np.abs(want))))


def generate(kit, hooks: list) -> list:
    ids = mlx_engine.tokenize(kit, PROMPT)
    return list(mlx_engine.create_generator_with_activations(kit, ids, hooks, max_tokens=6, top_logprobs=3))


def test_unedited_sae_changes_nothing_and_captures_its_encoding(kit, sae: SAE) -> None:
    plain = generate(kit, ["layers.1.residual", "layers.3.residual"])
    handle = mlx_engine.attach_sae(kit, sae)
    try:
        with_sae = generate(kit, ["layers.1.residual", "layers.3.residual", handle.hook()])
        ids = mlx_engine.tokenize(kit, PROMPT)
        logits = mlx_engine.run_with_cache(kit, ids, [handle.hook_id]).logits
    finally:
        handle.detach()
    assert np.array_equal(np.array(logits), np.array(mlx_engine.run_with_cache(kit, ids).logits))
    assert [r.token for r, _ in plain] == [r.token for r, _ in with_sae]
    assert [r.logprob for r, _ in plain] == [r.logprob for r, _ in with_sae]
    for (_, a), (_, b) in zip(plain, with_sae):
        for hook in ("layers.1.residual", "layers.3.residual"):
            assert all(np.array_equal(np.array(x.array), np.array(y.array)) for x, y in zip(a[hook], b[hook]))
        for resid, feats in zip(b["layers.1.residual"], b["layers.1.residual.sae_features"]):
            assert feats.component == "sae_features" and feats.positions == resid.positions and feats.shape[-1] == 512
            assert close(np.array(feats.array), np.array(sae.encode(resid.array)))
            assert (np.array(feats.array) > 0).sum(axis=-1).max() <= 16


def test_top_k_captures_are_ids_with_values(kit, sae: SAE) -> None:
    handle = mlx_engine.attach_sae(kit, sae, top_k=8)
    try:
        steps = generate(kit, ["layers.1.residual", handle.hook_id])
    finally:
        handle.detach()
    for _, acts in steps:
        (resid,), (top,) = acts["layers.1.residual"], acts[handle.hook_id]
        dense = np.array(sae.encode(resid.array))
        ids, values = np.array(top.array), np.array(top.extras["values"])
        assert ids.shape == values.shape == (dense.shape[0], 8) and top.dtype == "uint32"
        assert close(values, -np.sort(-dense, axis=-1)[:, :8])
        assert close(np.take_along_axis(dense, ids.astype(np.int64), axis=-1), values)
        assert np.all(np.diff(values, axis=-1) <= 0)


def downstream(kit, ids: list[int], interventions: list) -> np.ndarray:
    return np.array(mlx_engine.run_with_cache(kit, ids, ["layers.3.residual"], interventions=interventions)["layers.3.residual"])


def test_feature_edits_equal_adding_the_decoder_delta(kit, sae: SAE) -> None:
    ids = mlx_engine.tokenize(kit, PROMPT)
    w_dec = np.array(sae.W_dec)
    handle = mlx_engine.attach_sae(kit, sae)
    try:
        feats = np.array(mlx_engine.run_with_cache(kit, ids, [handle.hook_id])[handle.hook_id])
        p = 3
        i = int(np.argmax(feats[p]))
        clamped = mlx_engine.run_with_cache(kit, ids, [handle.hook(edit="before", hook_id="f_before"), handle.hook(hook_id="f_after"),
                                                      "layers.3.residual"], interventions=[handle.clamp(i, 7.5, positions=[p])])
        ablated = downstream(kit, ids, [handle.ablate(i, positions=[p])])
        added = downstream(kit, ids, [handle.add(5, 2.0)])
        scaled = downstream(kit, ids, [handle.scale(i, 3.0, positions=[p])])
        plain = downstream(kit, ids, [])
    finally:
        handle.detach()
    site = {"layer_name": "blocks.1.hook_resid_post", "op": "add"}
    by_hand = downstream(kit, ids, [{**site, "vector": (7.5 - feats[p, i]) * w_dec[i], "positions": [p]}])
    assert np.array_equal(np.array(clamped["layers.3.residual"]), by_hand)
    assert not np.allclose(by_hand, plain)
    assert np.array(clamped["f_after"])[p, i] == 7.5 and np.array_equal(np.array(clamped["f_before"]), feats)
    assert np.array_equal(ablated, downstream(kit, ids, [{**site, "vector": -feats[p, i] * w_dec[i], "positions": [p]}]))
    assert np.array_equal(added, downstream(kit, ids, [{**site, "vector": w_dec[5], "scale": 2.0}]))
    assert np.array_equal(scaled, downstream(kit, ids, [{**site, "vector": (3.0 * feats[p, i] - feats[p, i]) * w_dec[i], "positions": [p]}]))


def test_per_head_sae_on_z(kit) -> None:
    """An SAE on z reads the heads flattened ([T, H * D], SAELens's hook_z); unedited it changes nothing."""
    info = kit.arch_info
    d_in = info.n_heads * info.head_dim
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, d_in)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cfg = SAEConfig("standard", d_in=d_in, d_sae=64, hook_name="blocks.2.attn.hook_z", reshape_activations="hook_z")
    sae = SAE(cfg, {"W_enc": w.T.copy(), "W_dec": w, "b_enc": np.zeros(64, np.float32), "b_dec": np.zeros(d_in, np.float32)})
    ids = mlx_engine.tokenize(kit, PROMPT)
    plain = mlx_engine.run_with_cache(kit, ids, ["layers.2.z"])
    handle = mlx_engine.attach_sae(kit, sae)
    try:
        got = mlx_engine.run_with_cache(kit, ids, ["layers.2.z", handle.hook_id])
        feats = np.array(got[handle.hook_id])
        i = int(np.argmax(feats[1]))
        edited = downstream(kit, ids, [handle.clamp(i, 4.0, positions=[1])])
    finally:
        handle.detach()
    z = np.array(plain["layers.2.z"])
    assert np.array_equal(np.array(got.logits), np.array(plain.logits))
    assert close(feats, np.array(sae.encode(mx.array(z.transpose(1, 0, 2).reshape(len(ids), -1)))))
    delta = ((4.0 - feats[1, i]) * w[i]).reshape(info.n_heads, info.head_dim)
    assert np.array_equal(edited, downstream(kit, ids, [{"layer_name": "layers.2.z", "op": "add", "vector": delta, "positions": [1]}]))


def test_listing_names_and_errors(kit, sae: SAE, tmp_path: Path) -> None:
    before = dict(kit.hook_points)
    handle = mlx_engine.attach_sae(kit, sae)
    try:
        assert handle.hook_id == "layers.1.residual.sae_features" and handle.hook_id in kit.hook_points
        (entry,) = attached_saes(kit)
        assert entry["site"] == "layers.1.residual" and entry["d_sae"] == 512 and entry["hook_name"] == "blocks.1.hook_resid_post"
        for name in ({"layer_name": 1, "component": "sae_features"}, {"layer_name": "layers.1.residual", "component": "sae_features"},
                     "layers.1.residual.sae_features", "blocks.1.hook_resid_post.hook_sae_acts_post", "layers.1.sae_features"):
            (r,) = kit.resolve_hooks([name])
            assert (r.hook_id, r.component.value, r.site) == (handle.hook_id, "sae_features", handle.hook_id)
        with pytest.raises(HookSpecError, match="no SAE is attached at layer 2; name one of the attached SAEs: layers.1.residual.sae_features"):
            kit.resolve_hooks([{"layer_name": 2, "component": "sae_features"}])
        with pytest.raises(HookSpecError, match="no SAE is attached at layers.1.mlp"):
            kit.resolve_hooks(["layers.1.mlp.sae_features"])
        with pytest.raises(HookSpecError, match="index 600 is out of range: layers.1.residual.sae_features has 512 features"):
            kit.resolve_hooks([handle.hook(indices=[600])])
        with pytest.raises(SAEError, match="already attached at layers.1.residual"):
            mlx_engine.attach_sae(kit, sae)
    finally:
        detach_sae(kit, handle)
    assert dict(kit.hook_points) == before and type(kit.arch_info).__name__ == "ArchitectureInfo"
    with pytest.raises(HookSpecError, match="'sae_features' is not offered"):
        kit.resolve_hooks([{"layer_name": 1, "component": "sae_features"}])
    narrow = SAE(SAEConfig("standard", d_in=128, d_sae=8, hook_name="blocks.1.hook_resid_post"),
                 {"W_enc": np.zeros((128, 8)), "W_dec": np.zeros((8, 128)), "b_enc": np.zeros(8), "b_dec": np.zeros(128)})
    with pytest.raises(SAEError, match=r"d_in mismatch: the SAE reads 128 features per token but layers.1.residual \(blocks.1.hook_resid_post\) has 256"):
        mlx_engine.attach_sae(kit, narrow)
    with pytest.raises(HookSpecError, match="out of range"):
        mlx_engine.attach_sae(kit, sae, hook="blocks.9.hook_resid_post")
