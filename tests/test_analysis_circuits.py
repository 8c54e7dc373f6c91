"""The circuit analyses prove their own invariants on real models.

- logit lens: the last row is the model's own logits (4-bit gpt-oss with sinks, GPT-2 with a
  tied head and LayerNorm, Llama with lm_head, Gemma 2 with final soft-capping);
- DLA: the terms sum to the logit difference, and each layer's heads plus the attention bias
  to that layer's attention term;
- heads: a GPT-2 whose weights are set here to make layer 0 head 0 a previous-token head and
  layer 1 head 0 an induction head scores ~1 on both, and a random head scores low; a head
  whose o_proj columns are zeroed has importance exactly 0;
- patching: restoring everything gives 1, nothing 0, and one cell equals the same patch done by hand;
- bad requests fail with AnalysisError naming the problem.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from scipy.special import softmax

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine.analysis.attribution import SUM_TOLERANCE, direct_logit_attribution
from mlx_engine.analysis.common import AnalysisError, resolve_token
from mlx_engine.analysis.heads import head_importance, head_scores
from mlx_engine.analysis.lens import logit_lens
from mlx_engine.analysis.patching import activation_patching, prepare_patching
from mlx_engine.analysis.unembed import unembedding

PROMPT = "def encode(self, obj):\n    return json"
LOGIT_ATOL = 1e-5  # the lens's last row against an independent forward, float32

# The constructed induction model: d_model, heads, head_dim, positions, token-code width.
D, H, HD, P, DT = 192, 2, 96, 64, 48


def induction_gpt2(path: Path):
    """A 2-layer GPT-2 whose attention is set by hand: L0H0 attends to the previous position and writes
    that token into its own subspace; L1H0's query is the current token and its key the previous
    token stored there, so it attends to the token after the current token's previous occurrence.

    Every embedding lies in an orthonormal basis orthogonal to the all-ones vector, so LayerNorm's
    centring does nothing and its scale is the same at every position; MLPs are zero. L1H1 is random.
    """
    folder, _ = tc.build_gpt2(path, n_embd=D, n_head=H, n_layer=2, n_positions=P)
    kit = mlx_engine.load_model(folder)
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(np.concatenate([np.ones((D, 1)), rng.standard_normal((D, D - 1))], axis=1))
    tok, pos, prev = basis[:, 1:DT + 1], basis[:, DT + 1:DT + P + 1], basis[:, DT + P + 1:2 * DT + P + 1]
    codes = rng.standard_normal((kit.arch_info.vocab_size, DT))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    w = {k: np.zeros(v.shape) for k, v in tree_flatten(kit.model.parameters())}
    w["model.wte.weight"], w["model.wpe.weight"] = codes @ tok.T, pos.T
    for norm in ("model.h.0.ln_1", "model.h.0.ln_2", "model.h.1.ln_1", "model.h.1.ln_2", "model.ln_f"):
        w[f"{norm}.weight"] = np.ones(D)
    layer0, layer1 = w["model.h.0.attn.c_attn.weight"], w["model.h.1.attn.c_attn.weight"]  # rows: q, k, v
    layer0[0:P] = 4.0 * np.eye(P, k=1) @ pos.T  # query at i: position i - 1
    layer0[D:D + P] = pos.T  # key at j: position j
    layer0[2 * D:2 * D + DT] = tok.T  # value: the token
    w["model.h.0.attn.c_proj.weight"][:, 0:DT] = prev / np.sqrt(D / 2)  # undo LayerNorm's scale on 2 unit pieces
    layer1[0:DT] = 6.0 * tok.T  # query: the current token
    layer1[D:D + DT] = prev.T  # key: the previous token at that position
    for rows in (slice(HD, 2 * HD), slice(D + HD, D + 2 * HD), slice(2 * D + HD, 2 * D + 2 * HD)):
        layer1[rows] = rng.normal(0.0, 0.1, (HD, D))
    kit.model.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in w.items()])
    return kit


@pytest.fixture(scope="module")
def default_kit():
    return mlx_engine.load_model("default")


@pytest.fixture(scope="module")
def induction_kit(tmp_path_factory: pytest.TempPathFactory):
    return induction_gpt2(tmp_path_factory.mktemp("induction"))


@pytest.fixture(scope="module")
def gemma2_kit(tmp_path_factory: pytest.TempPathFactory):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    out = tmp_path_factory.mktemp("gemma2")
    tok = tc.build_tokenizer(out)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0, sliding_window=8,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Gemma2ForCausalLM(config)
    tc.spread_weights(model)
    tc._save(model.eval(), tok, out)
    return mlx_engine.load_model(out)


def _kit(name: str, request: pytest.FixtureRequest):
    return request.getfixturevalue({"default": "default_kit", "gpt2": "induction_kit", "llama": "llama_kit", "gemma2": "gemma2_kit"}[name])


@pytest.mark.parametrize("name", ["default", "gpt2", "llama", "gemma2"])
def test_logit_lens_last_layer_is_the_model_logits(name: str, request: pytest.FixtureRequest) -> None:
    kit = _kit(name, request)
    tokens = mlx_engine.tokenize(kit, PROMPT)
    lens = logit_lens(kit, tokens, top_k=3)
    n = kit.arch_info.num_layers
    assert lens.layers == ["embedding"] + [str(i) for i in range(n)]
    assert lens.final_logits_max_error == 0.0
    logits = np.array(mlx_engine.run_with_cache(kit, tokens).logits.astype(mx.float32))  # an independent forward
    cache = mlx_engine.run_with_cache(kit, tokens, [f"layers.{n - 1}.residual"])
    lensed = np.array(unembedding(kit).logits(cache[f"layers.{n - 1}.residual"]))
    np.testing.assert_allclose(lensed, logits, atol=LOGIT_ATOL, rtol=0)
    probs = softmax(logits.astype(np.float64), axis=-1)
    np.testing.assert_allclose(lens.top_probs[-1], -np.sort(-probs, axis=-1)[:, :3], atol=1e-6)
    assert lens.next_ids[:-1] == tokens[1:] and lens.next_ids[-1] == int(logits[-1].argmax())
    assert (lens.next_rank[-1, -1] == 0) and np.allclose(lens.kl_to_final[-1], 0.0, atol=1e-9)
    if name == "gemma2":
        assert unembedding(kit).softcap == 5.0 and np.abs(logits).max() <= 5.0


@pytest.mark.parametrize("name", ["default", "gpt2", "llama", "gemma2"])
def test_dla_terms_sum_to_the_logit_difference(name: str, request: pytest.FixtureRequest) -> None:
    kit = _kit(name, request)
    attr = direct_logit_attribution(kit, PROMPT, 11, 12, position=-2)
    magnitude = abs(attr.embedding) + np.abs(attr.attention).sum() + np.abs(attr.mlp).sum() + sum(map(abs, attr.constants.values()))
    assert magnitude > 0.1, "the terms are not vacuous"
    assert abs(attr.residual_error) <= SUM_TOLERANCE * (1 + magnitude), (attr.total, attr.sum_of_terms)
    if attr.heads is not None:
        np.testing.assert_allclose(attr.heads.sum(axis=1) + attr.attention_bias, attr.attention, rtol=1e-5, atol=1e-5)
    if name == "default":  # gpt-oss: o_proj has a bias, and it lands in the attention-bias term
        assert np.all(attr.attention_bias != 0.0)
    if name == "gpt2":  # LayerNorm: its bias is a constant term (zero in this construction, but present)
        assert "final norm bias" in attr.constants
    if name == "gemma2":  # sandwich norms: heads are not attributed
        assert attr.heads is None
    names = [t["name"] for t in attr.terms()]
    assert "embedding" in names and len(names) == len(set(names))


def test_constructed_induction_head_scores_high_and_a_random_head_low(induction_kit) -> None:
    scores = head_scores(induction_kit, repeat_length=20, importance=False, progress=False)
    t = scores.tables
    assert t["previous_token"][0, 0] > 0.99, t["previous_token"]
    assert t["induction"][1, 0] > 0.99, t["induction"]
    assert t["induction"][1, 1] < 0.15 and t["induction"][0, 0] < 0.05, t["induction"]
    assert t["duplicate_token"][1, 0] < 0.05  # it attends one past the duplicate
    assert t["sink_mass"] is None  # GPT-2 has no sinks
    assert scores.ranked("induction")[0] == {"layer": 1, "head": 0, "value": pytest.approx(t["induction"][1, 0])}


def test_default_model_head_scores_cover_every_head(default_kit) -> None:
    scores = head_scores(default_kit, PROMPT, repeat_length=12, progress=False)
    info = default_kit.arch_info
    for metric in ("entropy", "previous_token", "duplicate_token", "induction", "sink_mass", "importance_zero", "importance_mean"):
        table = scores.tables[metric]
        assert table.shape == (info.num_layers, info.n_heads) and np.all(np.isfinite(table)), metric
    assert np.all((scores.tables["sink_mass"] >= -1e-6) & (scores.tables["sink_mass"] <= 1))
    assert scores.tables["sink_mass"].max() > 0.01  # gpt-oss's sinks take real mass
    assert np.all(scores.tables["induction"] <= 1 + 1e-6)


def test_head_importance_is_zero_for_a_head_whose_output_columns_are_zeroed(llama_checkpoint: Path) -> None:
    kit = mlx_engine.load_model(llama_checkpoint)  # our own copy: the weights are edited
    layer, head, hd = 1, 2, kit.arch_info.head_dim
    proj = kit.model.layers[layer].self_attn.o_proj
    weight = np.array(proj.weight)
    weight[:, head * hd:(head + 1) * hd] = 0.0
    proj.weight = mx.array(weight)
    importance, clean = head_importance(kit, PROMPT, progress=False)
    for op in ("zero", "mean"):
        assert importance[op][layer, head] == 0.0, importance[op]
        assert np.abs(importance[op]).max() > 1e-3, "other heads matter"
    assert clean > 0


@pytest.fixture(scope="module")
def patching(default_kit):
    return prepare_patching(default_kit, "The cat sat on the mat. The cat", "The dog sat on the mat. The dog", components=("residual", "z"))


def test_patching_everything_restores_one_and_nothing_zero(patching) -> None:
    n = patching.kit.arch_info.num_layers
    assert patching.fraction([]) == 0.0
    for layer in (0, n - 1):
        assert patching.fraction([patching.patch(layer, "residual", "all")]) == pytest.approx(1.0, abs=1e-5)
    heads = list(range(patching.kit.arch_info.n_heads))
    assert patching.fraction([patching.patch(0, "z", "all", heads=heads)]) != pytest.approx(0.0, abs=1e-3)


def test_a_patching_cell_equals_the_patch_done_by_hand(patching) -> None:
    kit = patching.kit
    result = activation_patching(patching, "residual", layers=[1, 2], positions=[2, -1], progress=False)
    assert result.fractions.shape == (2, 2) and result.columns == [2, len(patching.clean_tokens) - 1]
    clean = mlx_engine.run_with_cache(kit, patching.clean_tokens, ["layers.2.residual"])
    spec = {"layer_name": 2, "component": "residual", "op": "patch", "source": clean, "positions": [2]}
    logits = np.array(mlx_engine.run_with_cache(kit, patching.corrupted_tokens, interventions=[spec]).logits)
    metric = logits[-1, patching.target] - logits[-1, patching.foil]
    assert result.metrics[1, 0] == pytest.approx(metric, abs=1e-5)
    assert result.fractions[1, 0] == pytest.approx((metric - patching.corrupted_metric) / (patching.clean_metric - patching.corrupted_metric), abs=1e-5)
    heads = activation_patching(patching, "z", layers=[0], heads=[3], progress=False)
    clean_z = mlx_engine.run_with_cache(kit, patching.clean_tokens, ["layers.0.z"])
    spec = {"layer_name": 0, "component": "z", "op": "patch", "source": clean_z, "heads": [3]}
    logits = np.array(mlx_engine.run_with_cache(kit, patching.corrupted_tokens, interventions=[spec]).logits)
    assert heads.metrics[0, 0] == pytest.approx(logits[-1, patching.target] - logits[-1, patching.foil], abs=1e-5)


def test_noise_corruption_is_recovered_by_restoring_the_last_residual(default_kit) -> None:
    setup = prepare_patching(default_kit, "The cat sat on the mat. The cat", noise_positions=[1, 2], metric="prob", seed=3)
    assert setup.noise and setup.corrupted_tokens == setup.clean_tokens
    assert setup.fraction([]) == 0.0
    assert setup.fraction([setup.patch(3, "residual", "all")]) == pytest.approx(1.0, abs=1e-5)


def test_bad_requests_say_what_is_wrong(default_kit) -> None:
    kit = default_kit
    with pytest.raises(AnalysisError, match="not one token"):
        resolve_token(kit, "definitely not one token")
    with pytest.raises(AnalysisError, match="outside the vocabulary"):
        direct_logit_attribution(kit, PROMPT, 10**7, 3)
    with pytest.raises(AnalysisError, match="same number of tokens"):
        prepare_patching(kit, "The cat sat", "The cat sat on the mat")
    with pytest.raises(AnalysisError, match="not both and not neither"):
        prepare_patching(kit, "The cat sat")
    with pytest.raises(AnalysisError, match="out of range"):
        direct_logit_attribution(kit, PROMPT, 11, 12, position=999)
    setup = prepare_patching(kit, "The cat sat on the mat. The cat", "The dog sat on the mat. The dog")
    with pytest.raises(AnalysisError, match="layers 0..3"):
        activation_patching(setup, layers=[4], progress=False)
    with pytest.raises(AnalysisError, match="did not capture 'z'"):
        activation_patching(setup, "z", progress=False)
    with pytest.raises(AnalysisError, match="unknown metric"):
        prepare_patching(kit, "The cat", "The dog", metric="accuracy")
    with pytest.raises(AnalysisError, match="nothing to recover"):
        prepare_patching(kit, "The cat", "The cat")
