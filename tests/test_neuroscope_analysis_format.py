"""Analysis results in NeuroScope's format: `convert_analysis_for_neuroscope` and the Smalltalk
`convertAnalysisForNeuroScope:` (run in Amber on Node) on real results computed here on the tiny
llama: top examples from an extracted store, head scores, residual and per-head patching grids,
and an attached SAE's dense and top-k `sae_features` captures.

Every converted result validates against neuroscope_analysis.schema.json; its flat data equal
the result's own tables read row-major by numpy (exactly: the same float64 values); the Amber
conversion equals the Python one on the same JSON input (within 1e-12 relative: JavaScript
reprints the same doubles, so in practice exactly).
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

import mlx_engine  # noqa: I001  (first: it picks the BLAS before MLX loads)
import numpy as np
import pytest
from amber_eval import amber_eval
from jsonschema import Draft202012Validator

from mlx_engine.analysis.heads import head_scores
from mlx_engine.analysis.neurons.examples import top_examples
from mlx_engine.analysis.patching import activation_patching, prepare_patching
from mlx_engine.integrations.neuroscope.analysis_format import (
    analysis_kind,
    convert_analysis_for_neuroscope,
    load_analysis_schema,
)
from mlx_engine.integrations.neuroscope.smalltalk import generate_smalltalk_client
from mlx_engine.sae import SAE, SAEConfig
from mlx_engine.wire.codec import encode_capture

VALIDATOR = Draft202012Validator(load_analysis_schema())
D_SAE = 64
TOP_K = 5


def jsonable(value: Any) -> Any:
    """A result as it travels over HTTP."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def results(llama_kit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    kit = llama_kit
    lines = [line for line in inspect.getsource(textwrap).splitlines() if line.strip()][:24]
    store = mlx_engine.extract(kit, lines, ["layers.0.mlp_post"], tmp_path_factory.mktemp("analysis") / "store",
                               context_size=16, batch_size=4, top_k=4, progress=False)
    ids = mlx_engine.tokenize(kit, "The cat sat on the mat and the dog")
    corrupted = list(ids)
    corrupted[2] = (corrupted[2] + 7) % 100 + 3
    setup = prepare_patching(kit, ids, corrupted, components=("residual", "z"))
    rng = np.random.default_rng(0)
    d_in = int(np.array(mlx_engine.run_with_cache(kit, ids, ["layers.1.residual"])["layers.1.residual"]).shape[-1])
    arrays = {"W_enc": rng.normal(size=(d_in, D_SAE)).astype(np.float32) * 0.1, "b_enc": np.zeros(D_SAE, np.float32),
              "W_dec": rng.normal(size=(D_SAE, d_in)).astype(np.float32) * 0.1, "b_dec": np.zeros(d_in, np.float32)}
    sae = SAE(SAEConfig("standard", d_in, D_SAE, hook_name="blocks.1.hook_resid_post"), arrays)
    captures = {}
    for mode, top_k in (("dense", None), ("top_k", TOP_K)):
        handle = mlx_engine.attach_sae(kit, sae, hook="layers.1.residual", top_k=top_k)
        try:
            steps = list(mlx_engine.create_generator_with_activations(kit, ids, [handle.hook_id], max_tokens=2))
        finally:
            handle.detach()
        captures[mode] = [encode_capture(c, "json") for _, acts in steps for c in acts[handle.hook_id]]
    return {
        "top_examples": jsonable(top_examples(store, "layers.0.mlp_post", 5, context=3)),
        "head_scores": jsonable(head_scores(kit, progress=False, importance=False).to_json()),
        "patching": jsonable(activation_patching(setup, "residual", progress=False).to_json()),
        "patching_heads": jsonable(activation_patching(setup, "z", layers=[0, 1], progress=False).to_json()),
        "sae_dense": jsonable(captures["dense"]),
        "sae_top_k": jsonable({"activations": {"layers.1.residual.sae_features": captures["top_k"]}}),
    }


KINDS = {"top_examples": "top_examples", "head_scores": "head_scores", "patching": "patching",
         "patching_heads": "patching", "sae_dense": "sae_features", "sae_top_k": "sae_features"}


@pytest.mark.parametrize("name", list(KINDS))
def test_each_result_converts_to_the_schema_with_its_own_numbers(results: dict[str, Any], name: str) -> None:
    result = results[name]
    converted = convert_analysis_for_neuroscope(result)
    assert analysis_kind(result) == converted["kind"] == KINDS[name]
    VALIDATOR.validate(converted)
    if name == "top_examples":
        assert len(converted["examples"]) == len(result) > 0
        for got, want in zip(converted["examples"], result):
            assert got["tokens"] == want["tokens"] and got["values"] == want["values"]
            assert got["maxValue"] == want["values"][got["maxValueTokenIndex"]] == max(want["values"])
    elif name == "head_scores":
        measured = {m: t for m, t in result["tables"].items() if t is not None}
        assert set(converted["metrics"]) == set(measured) and measured
        for metric, table in measured.items():
            grid = converted["metrics"][metric]
            assert grid["shape"] == [result["n_layers"], result["n_heads"]]
            assert grid["data"] == np.asarray(table, dtype=np.float64).reshape(-1).tolist()
    elif name.startswith("patching"):
        fractions = np.asarray(result["fractions"], dtype=np.float64)
        assert converted["shape"] == [len(result["layers"]), len(result["columns"])] == list(fractions.shape)
        assert converted["fractions"] == fractions.reshape(-1).tolist()
        assert converted["column_kind"] == ("head" if name == "patching_heads" else "position")
    else:
        captures = result if isinstance(result, list) else next(iter(result["activations"].values()))
        assert [f["step"] for f in converted["features"]] == [c["step"] for c in captures] == [0, 1]
        for entry, capture in zip(converted["features"], captures):
            data = np.asarray(capture["data"])
            if name == "sae_dense":
                assert entry["mode"] == "dense" and entry["shape"][-1] == D_SAE and "feature_ids" not in entry
                assert entry["values"] == data.astype(np.float64).reshape(-1).tolist()
            else:
                values = np.asarray(capture["values"]["data"], dtype=np.float64)
                assert entry["mode"] == "top_k" and entry["shape"][-1] == TOP_K
                assert entry["feature_ids"] == data.reshape(-1).tolist()
                assert entry["values"] == values.reshape(-1).tolist() and np.all(np.diff(values, axis=-1) <= 0)


def test_schema_refuses_a_wrong_result(results: dict[str, Any]) -> None:
    converted = convert_analysis_for_neuroscope(results["patching"])
    assert not VALIDATOR.is_valid({**converted, "column_kind": "token"})
    assert not VALIDATOR.is_valid({**converted, "kind": "head_scores"})
    entry = convert_analysis_for_neuroscope(results["sae_dense"])
    assert not VALIDATOR.is_valid({**entry, "features": [{**entry["features"][0], "mode": "top_k"}]})


def test_an_unknown_result_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="top examples .* head scores .* patching result .* sae_features"):
        convert_analysis_for_neuroscope({"rows": [1, 2]})


def close(got: Any, want: Any) -> bool:
    """Equal JSON, numbers within 1e-12 relative."""
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(close(g, w) for g, w in zip(got, want))
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-12 * max(1.0, abs(want))
    return got == want


def test_amber_converts_as_python_does(results: dict[str, Any], tmp_path: Path) -> None:
    source = tmp_path / "client.st"
    source.write_text(generate_smalltalk_client("amber"), encoding="utf-8")
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps(results), encoding="utf-8")
    expression = (
        "| client inputs out | client := NeuroScopeMLXClient new. "
        f"inputs := client parseJson: ((require value: 'fs') readFileSync: '{inputs}' encoding: 'utf8'). "
        "out := Dictionary new. inputs keysAndValuesDo: [ :name :result | "
        "out at: name put: (client convertAnalysisForNeuroScope: result) ]. out"
    )
    status, summary, output = amber_eval([source], expression)
    assert status == 0, output
    for name, result in results.items():
        assert close(summary["value"][name], convert_analysis_for_neuroscope(result)), name


def test_amber_refuses_an_unknown_result(tmp_path: Path) -> None:
    source = tmp_path / "client.st"
    source.write_text(generate_smalltalk_client("amber"), encoding="utf-8")
    expression = "NeuroScopeMLXClient new convertAnalysisForNeuroScope: (Dictionary new at: 'rows' put: #(1 2); yourself)"
    status, summary, output = amber_eval([source], expression)
    assert status == 1 and "not an analysis result NeuroScope knows" in summary["error"], output
