"""Top examples (of neurons and of directions) and reverse queries, each equal to a brute-force sort or count
over the store's rows; Neuronpedia's fields, the text and HTML shading, and the errors of a bad request."""

from __future__ import annotations

import inspect
import json
import textwrap
from collections import defaultdict

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest

from mlx_engine.analysis.neurons.common import NeuronError, TokenText
from mlx_engine.analysis.neurons.examples import direction_examples, examples_html, examples_text, top_examples
from mlx_engine.analysis.neurons.reverse import ngram_table, neuron_ngrams, token_neurons

HOOKS = ["layers.0.mlp_post", "layers.1.residual"]
CONTEXT = 3


@pytest.fixture(scope="module")
def store(llama_kit, tmp_path_factory: pytest.TempPathFactory):
    lines = [line for line in inspect.getsource(textwrap).splitlines() if line.strip()][:70]
    folder = tmp_path_factory.mktemp("neuron_examples")
    return mlx_engine.extract(llama_kit, lines, HOOKS, folder / "store", context_size=24, batch_size=4, shard_tokens=300,
                              top_k=7, progress=False)


@pytest.fixture(scope="module")
def arrays(store):
    doc, pos = (np.asarray(a) for a in store.index())
    return {"tokens": np.asarray(store.tokens()), "doc": doc, "pos": pos, **{h: np.asarray(store.rows(h)).astype(np.float64) for h in HOOKS}}


def brute_window(a: dict, row: int) -> list[int]:
    return [r for r in range(row - CONTEXT, row + CONTEXT + 1) if 0 <= r < len(a["doc"]) and a["doc"][r] == a["doc"][row]]


def test_top_examples_equal_a_full_sort(store, arrays, llama_kit) -> None:
    a = arrays
    text = TokenText(store, llama_kit)
    for neuron in (0, 17, 127):
        x = a["layers.0.mlp_post"][:, neuron]
        order = np.lexsort((a["pos"], a["doc"], -x))[:7]
        got = top_examples(store, "layers.0.mlp_post", neuron, context=CONTEXT, text=text)
        assert [e["row"] for e in got] == order.tolist()
        for e in got:
            window = brute_window(a, e["row"])
            assert e["token_ids"] == a["tokens"][window].tolist() and e["positions"] == a["pos"][window].tolist()
            assert e["tokens"] == [llama_kit.tokenizer.decode([int(t)]) for t in a["tokens"][window]]
            np.testing.assert_allclose(e["values"], x[window])
            assert e["maxValue"] == x[e["row"]] == e["values"][e["maxValueTokenIndex"]]
            assert window[e["maxValueTokenIndex"]] == e["row"]
    json.dumps(got)


def test_direction_examples_equal_a_full_sort(store, arrays) -> None:
    v = np.random.default_rng(0).normal(size=store.hook_info("layers.1.residual")["width"])
    proj = arrays["layers.1.residual"] @ v
    got = direction_examples(store, "layers.1.residual", v, k=9, context=CONTEXT, block_rows=100)
    order = np.lexsort((np.arange(len(proj)), -proj))[:9]
    assert [e["row"] for e in got] == order.tolist()
    np.testing.assert_allclose([e["maxValue"] for e in got], proj[order])
    for e in got:
        np.testing.assert_allclose(e["values"], proj[brute_window(arrays, e["row"])])
    # The unit vector of one neuron ranks as that neuron does (ties at 0 aside).
    unit = np.eye(len(v))[5]
    neuron = [e["row"] for e in top_examples(store, "layers.1.residual", 5, context=CONTEXT)]
    assert [e["row"] for e in direction_examples(store, "layers.1.residual", unit, k=7, context=CONTEXT)] == neuron


def test_text_and_html_shade_by_value(store) -> None:
    examples = top_examples(store, "layers.0.mlp_post", 3, k=3, context=CONTEXT)
    lines = examples_text(examples).splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{examples[0]['maxValue']:+.4g} doc {examples[0]['doc']}")
    assert "█«" in lines[0]  # the largest value overall gets the full block, and the peak is marked
    page = examples_html(examples, "neuron 3")
    assert page.count("<span") == sum(len(e["tokens"]) for e in examples) and "rgba(255,120,0,1.000)" in page
    assert page.count("outline:1px solid black") == 3


def brute_ngrams(a: dict, hook: str, n: int) -> dict[tuple, list[np.ndarray]]:
    table = defaultdict(list)
    for r in range(n - 1, len(a["tokens"])):
        span = range(r - n + 1, r + 1)
        if len({a["doc"][i] for i in span}) == 1 and all(a["pos"][i + 1] == a["pos"][i] + 1 for i in span[:-1]):
            table[tuple(a["tokens"][list(span)].tolist())].append(a[hook][r])
    return table


def test_ngram_tables_equal_a_brute_force_count(store, arrays) -> None:
    for n in (1, 2, 3):
        brute = brute_ngrams(arrays, "layers.0.mlp_post", n)
        table = ngram_table(store, "layers.0.mlp_post", n, neurons=[2, 40], block_rows=77)
        assert {tuple(k) for k in table.keys.tolist()} == set(brute)
        for key, count, mean in zip(table.keys.tolist(), table.counts, table.means):
            values = np.array(brute[tuple(key)])
            assert count == len(values)
            np.testing.assert_allclose(mean, values[:, [2, 40]].mean(axis=0), rtol=1e-9, atol=1e-12)
        ranked = sorted(((-np.mean([v[40] for v in vals]), -len(vals), key) for key, vals in brute.items() if len(vals) >= 2))
        got = table.top_ngrams(40, top=5, min_count=2)
        assert [tuple(g["ngram"]) for g in got] == [r[2] for r in ranked[:5]]
    text = TokenText(store)
    bigrams = ngram_table(store, "layers.0.mlp_post", 2, [40]).top_ngrams(40, 5, 2, text)
    assert neuron_ngrams(store, "layers.0.mlp_post", [40], n=(2,), top=5, text=text)[40][2] == bigrams
    assert all(g["text"] == text(g["ngram"]) for g in bigrams)


def test_token_neurons_equal_brute_force_means(store, arrays, llama_kit) -> None:
    tokens = arrays["tokens"]
    common = int(np.bincount(tokens).argmax())
    result = token_neurons(store, [common], top=6)
    where = tokens == common
    assert result["count"] == int(where.sum())
    for hook in HOOKS:
        mean = arrays[hook][where].mean(axis=0)
        got = result["hooks"][hook]["neurons"]
        assert [g["neuron"] for g in got] == np.lexsort((np.arange(len(mean)), -mean))[:6].tolist()
        np.testing.assert_allclose([g["mean"] for g in got], np.sort(mean)[::-1][:6], rtol=1e-9)
    brute = brute_ngrams(arrays, "layers.1.residual", 2)
    key = max(brute, key=lambda k: len(brute[k]))
    pair = token_neurons(store, " ".join(f"#{t}" for t in key), ["layers.1.residual"], top=3, block_rows=50)
    assert pair["ngram"] == list(key) and pair["count"] == len(brute[key])
    mean = np.mean(brute[key], axis=0)
    assert [g["neuron"] for g in pair["hooks"]["layers.1.residual"]["neurons"]] == np.argsort(-mean, kind="stable")[:3].tolist()
    as_text = token_neurons(store, llama_kit.tokenizer.decode(list(key)), ["layers.1.residual"], top=3, kit=llama_kit)
    assert as_text["ngram"] == list(key)


def test_bad_requests_say_what_is_wrong(store) -> None:
    with pytest.raises(NeuronError, match="neuron 999 is out of range: layers.0.mlp_post has 128 neurons"):
        top_examples(store, "layers.0.mlp_post", 999)
    with pytest.raises(NeuronError, match="hook 'layers.0.residual' is not in the store"):
        ngram_table(store, "layers.0.residual")
    with pytest.raises(NeuronError, match="a direction of layers.1.residual is a finite vector of 64 values"):
        direction_examples(store, "layers.1.residual", np.ones(63))
    with pytest.raises(NeuronError, match="n \\(the n-gram length\\) must be a positive integer"):
        ngram_table(store, "layers.0.mlp_post", 0)
