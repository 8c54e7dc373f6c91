"""A planted neuron and a dead one, made by editing a tiny Llama's weights, found by the analyses; and dynamic-k
on that model against a transformers perplexity.

The edit (layer 0): residual dimension D is zero in every token's embedding but that of " return" and never
written by layer 0's attention (row D of o_proj is zero), so after the norm it is non-zero exactly at
" return". Neuron PLANTED reads only dimension D in gate_proj and up_proj, so its silu(gate) * up is
positive at " return" and exactly 0 elsewhere; neuron DEAD has zero gate and up rows, so it is 0 everywhere.
"""

from __future__ import annotations

import inspect
import json
import json.decoder
import json.scanner

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
import torch

import tiny_checkpoints as tc
from mlx_engine.analysis.neurons.dynamic_k import FRACTIONS, dynamic_k
from mlx_engine.analysis.neurons.examples import top_examples
from mlx_engine.analysis.neurons.reverse import neuron_ngrams, token_neurons
from mlx_engine.analysis.neurons.stats import layer_summaries, neuron_table

D, PLANTED, DEAD = 7, 42, 99
TOKEN = " return"
HOOKS = [f"layers.{i}.mlp_post" for i in range(3)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    path, model = tc.build_llama(tmp_path_factory.mktemp("planted"))
    tokenizer = tc.PreTrainedTokenizerFast.from_pretrained(path)
    (token,) = tokenizer.encode(TOKEN, add_special_tokens=False)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, D] = 0.0
        emb[token, D] = 6.0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight[D, :] = 0.0
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[PLANTED, :] = 0.0
            proj.weight[PLANTED, D] = 2.0
            proj.weight[DEAD, :] = 0.0
    model.save_pretrained(path, safe_serialization=True)
    kit = mlx_engine.load_model(path)
    texts = [inspect.getsource(f) for f in (json.decoder.py_scanstring, json.decoder.JSONObject, json.decoder.JSONArray)]
    corpus = path.parent / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    store = mlx_engine.extract(kit, corpus, HOOKS, path.parent / "store", context_size=128, batch_size=4, top_k=8, progress=False)
    return kit, store, token, model


def test_the_planted_neuron_fires_only_on_its_token(planted) -> None:
    kit, store, token, _ = planted
    x = np.asarray(store.rows("layers.0.mlp_post"))
    tokens = np.asarray(store.tokens())
    assert (tokens == token).sum() >= 5
    assert (x[tokens == token, PLANTED] > 10).all() and (x[tokens != token, PLANTED] == 0).all()
    result = token_neurons(store, TOKEN, kit=kit)
    assert result["ngram"] == [token] and result["count"] == int((tokens == token).sum())
    assert result["hooks"]["layers.0.mlp_post"]["neurons"][0]["neuron"] == PLANTED
    top = neuron_ngrams(store, "layers.0.mlp_post", PLANTED, n=(1, 2), min_count=1)[PLANTED]
    assert top[1][0]["ngram"] == [token] and top[1][0]["count"] == result["count"]
    assert all(g["ngram"][-1] == token for g in top[2][:3])  # every bigram ending in the token ranks above the rest
    examples = top_examples(store, "layers.0.mlp_post", PLANTED)
    firing = min(len(examples), result["count"])  # after the token's occurrences come ties at 0
    assert {e["token_id"] for e in examples[:firing]} == {token} and all(e["value"] == 0 for e in examples[firing:])


def test_the_zeroed_neuron_is_reported_dead(planted) -> None:
    _, store, _, _ = planted
    table = neuron_table(store, "layers.0.mlp_post")
    assert np.nonzero(table.dead)[0].tolist() == [DEAD]
    assert np.asarray(store.rows("layers.0.mlp_post"))[:, DEAD].max() == 0.0
    summary = {s["hook_id"]: s for s in layer_summaries(store)}
    assert summary["layers.0.mlp_post"]["dead"] == 1 and summary["layers.1.mlp_post"]["dead"] == 0


def test_dynamic_k_perplexity_equals_transformers_and_k1_changes_nothing(planted) -> None:
    kit, _, _, model = planted
    text = inspect.getsource(json.scanner)
    result = dynamic_k(kit, text, FRACTIONS, seeds=(0, 1, 2), window=48, windows=2)
    assert result["component"] == "mlp_post" and result["d_mlp"] == 128
    assert [s["fraction"] for s in result["summary"]] == ["unmodified", *FRACTIONS]
    assert [s["k"] for s in result["summary"]] == [128, 13, 26, 38, 64, 90, 128]
    assert result["k1_difference"] <= 0.01
    tokens = mlx_engine.tokenize(kit, text)
    for seed in (0, 1, 2):  # the windows each seed draws, and their perplexity through transformers
        starts = np.random.default_rng(seed).integers(0, len(tokens) - 48 + 1, size=2)
        nll, count = 0.0, 0
        for s in starts:
            ids = torch.tensor([tokens[s : s + 48]])
            with torch.no_grad():
                logits = model(ids).logits[0].double()
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            count += 47
        mine = next(r for r in result["rows"] if r["fraction"] == "unmodified" and r["seed"] == seed)
        assert mine["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-4)
    by_fraction = {s["fraction"]: s for s in result["summary"]}
    for f in FRACTIONS:
        ppl = [r["perplexity"] for r in result["rows"] if r["fraction"] == f]
        assert by_fraction[f]["perplexity_mean"] == pytest.approx(np.mean(ppl)) and by_fraction[f]["perplexity_std"] == pytest.approx(np.std(ppl))
    assert by_fraction[1.0]["relative_perplexity_mean"] == pytest.approx(1.0, abs=1e-4)
    assert abs(by_fraction[0.1]["perplexity_mean"] - by_fraction["unmodified"]["perplexity_mean"]) > 0.01  # the gate really acts
