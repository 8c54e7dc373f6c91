"""Every script in examples/ runs as a user runs it, against the embedded default model.

Each example is a subprocess (`python examples/X.py ...`); the REST ones talk to one real
server started for this module. Passing means more than exit code 0: the numbers an
example prints are checked against the same quantities computed here by another path
(in-process `run_with_cache`, or a non-streamed request decoded by the Python client),
and the NeuroScope files it writes must validate against the format's JSON Schema.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from neuroscope_server import running_server

import mlx_engine
from mlx_engine.integrations.neuroscope.client import NeuroScopeClient
from mlx_engine.integrations.neuroscope.format import load_schema
from mlx_engine.loading import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FLOAT = r"-?\d+\.\d+"

needs_model = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the embedded default model is not in this checkout"
)

# Each file in examples/ -> the tests that run it: the one record of which test runs which
# example. No test names a script itself: each takes the `example` fixture, which hands it the
# script this table files it under. "module::test" is a test in another module (steering.py is
# run, on the default model too, by tests/test_interventions_example.py, whose `example`
# fixture loads that module's EXAMPLE). test_every_example_is_run_by_a_test checks the table
# against examples/, so an example without a test fails the suite.
EXAMPLE_TESTS: dict[str, tuple[str, ...]] = {
    "basic_capture.py": ("test_basic_capture_rows_match_run_with_cache",),
    "run_with_cache.py": ("test_run_with_cache_prints_every_layer",),
    "rest_streaming.py": (
        "test_rest_streaming_norms_match_a_whole_request",
        "test_rest_streaming_serves_itself",
        "test_rest_streaming_says_how_to_start_a_server",
    ),
    "neuroscope_bridge.py": ("test_neuroscope_bridge_writes_valid_files",),
    "openai_extra_body.py": ("test_openai_extra_body_whole_and_streamed_agree",),
    "steering.py": (
        "test_interventions_example::test_steering_raises_the_class_frequency_where_the_direction_exists",
        "test_interventions_example::test_example_steers_the_default_model",
    ),
}
EXAMPLE_OF_TEST = {test: name for name, tests in EXAMPLE_TESTS.items() for test in tests if "::" not in test}


@pytest.fixture
def example(request: pytest.FixtureRequest) -> Path:
    """The script EXAMPLE_TESTS files the requesting test under."""
    test = request.function.__name__
    assert test in EXAMPLE_OF_TEST, f"{test} takes `example` but EXAMPLE_TESTS does not list it"
    return EXAMPLES / EXAMPLE_OF_TEST[test]


def run_example(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{script.name} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done


def floats(text: str) -> list[float]:
    return [float(x) for x in re.findall(FLOAT, text)]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_server("default") as url:
        yield url


@pytest.fixture(scope="module")
def kit():
    return mlx_engine.load_model("default")


def residual_norms(base_url: str, prompt: str, layers: list[int], max_tokens: int) -> tuple[list[str], np.ndarray]:
    """Tokens and [step, layer] norms of the newest residual row, from one whole greedy request."""
    hooks = [{"layer_name": i, "component": "residual"} for i in layers]
    result = NeuroScopeClient(base_url).generate_with_activations(prompt, hooks, max_tokens=max_tokens, temperature=0.0)
    norms = np.array(
        [[np.linalg.norm(c.array[-1]) for c in result.captures[f"layers.{i}.residual"]] for i in layers]
    ).T
    return result.tokens, norms


def test_every_example_is_run_by_a_test() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    uncovered = scripts - {name for name, tests in EXAMPLE_TESTS.items() if tests}
    assert not uncovered, f"examples with no test running them: {sorted(uncovered)}; add them to EXAMPLE_TESTS in tests/test_examples.py"
    assert not EXAMPLE_TESTS.keys() - scripts, "a covered example no longer exists"
    listed = [test for tests in EXAMPLE_TESTS.values() for test in tests]
    assert len(listed) == len(set(listed)), "a test is filed under two examples"
    this_module = sys.modules[__name__]
    for name, tests in EXAMPLE_TESTS.items():
        for test in tests:
            module_name, _, function_name = test.rpartition("::")
            module = importlib.import_module(module_name) if module_name else this_module
            function = getattr(module, function_name, None)
            assert callable(function), f"{test} is listed but not defined"
            # It gets the script from the `example` fixture, which the table (here) or the
            # module's EXAMPLE (elsewhere) points at this example.
            assert "example" in inspect.signature(function).parameters, f"{test} does not take the `example` fixture"
            if module_name:
                assert Path(module.EXAMPLE) == EXAMPLES / name, f"{module_name}.EXAMPLE is {module.EXAMPLE}, not {name}"
    # And every test here that takes `example` is in the table.
    takers = {
        n for n, f in vars(this_module).items()
        if n.startswith("test_") and callable(f) and "example" in inspect.signature(f).parameters
    }
    assert takers == EXAMPLE_OF_TEST.keys(), takers ^ EXAMPLE_OF_TEST.keys()


@needs_model
def test_basic_capture_rows_match_run_with_cache(kit, example: Path) -> None:
    out = run_example(example).stdout
    n_layers = kit.arch_info.num_layers
    header, *lines = [line for line in out.splitlines() if line.strip()]
    assert header.split() == ["token"] + [w for i in range(n_layers) for w in ("layer", str(i))], header
    rows = [floats(line)[-n_layers:] for line in lines]
    assert 1 <= len(rows) <= 16 and all(len(r) == n_layers for r in rows), out
    assert all(0 < v < 1e4 for r in rows for v in r), out
    # The first token comes with the prompt's captures: its row is the prompt's last position.
    prompt = mlx_engine.chat_tokens(kit, [{"role": "user", "content": "Write a Python function."}])
    cache = mlx_engine.run_with_cache(kit, prompt, [{"layer_name": i, "component": "residual"} for i in range(n_layers)])
    want = [float(np.linalg.norm(np.array(cache[f"layers.{i}.residual"])[-1])) for i in range(n_layers)]
    np.testing.assert_allclose(rows[0], want, atol=0.006)  # printed with 2 decimals


@needs_model
def test_run_with_cache_prints_every_layer(kit, example: Path) -> None:
    out = run_example(example).stdout.splitlines()
    text = "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n"
    n_tokens = len(mlx_engine.tokenize(kit, text))
    assert out[0] == f"{n_tokens} tokens; logits ({n_tokens}, {kit.arch_info.vocab_size})", out[0]
    layer_lines = [line for line in out if line.startswith("layer ")]
    assert len(layer_lines) == kit.arch_info.num_layers, out
    for line in layer_lines:
        norm = float(re.search(r"mean residual norm\s+(" + FLOAT + ")", line).group(1))
        weights = [float(w) for w in re.findall(r"\((" + FLOAT + r")\)", line)]
        assert norm > 0 and len(weights) == 3, line
        assert all(0 <= w <= 1 for w in weights) and weights == sorted(weights, reverse=True), line


ROW = re.compile(r"^\s*(\d+)\s+('.*'|\".*\")\s+((?:\s*" + FLOAT + ")+)$")


def parse_rest_rows(stdout: str) -> list[tuple[int, str, list[float]]]:
    return [(int(m[1]), ast.literal_eval(m[2]), floats(m[3])) for m in map(ROW.match, stdout.splitlines()) if m]


@needs_model
def test_rest_streaming_norms_match_a_whole_request(base_url: str, example: Path) -> None:
    prompt, max_tokens = "Read a file.", 4
    out = run_example(example, "--base-url", base_url, "--prompt", prompt, "--max-tokens", str(max_tokens)).stdout
    rows = parse_rest_rows(out)
    assert [r[0] for r in rows] == list(range(max_tokens)), out
    tokens, norms = residual_norms(base_url, prompt, list(range(len(rows[0][2]))), max_tokens)
    assert [r[1] for r in rows] == tokens
    np.testing.assert_allclose([r[2] for r in rows], norms, atol=0.0006)  # printed with 3 decimals
    assert "finish reason: length" in out


@needs_model
def test_rest_streaming_serves_itself(example: Path) -> None:
    out = run_example(example, "--serve", "--max-tokens", "2").stdout
    rows = parse_rest_rows(out)
    assert [r[0] for r in rows] == [0, 1] and all(v > 0 for r in rows for v in r[2]), out


def test_rest_streaming_says_how_to_start_a_server(example: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    done = subprocess.run(
        [sys.executable, str(example), "--base-url", url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "mlx-engine serve" in done.stderr and url in done.stderr, done.stderr


def check_entry(entry: dict[str, Any]) -> np.ndarray:
    data = np.array(entry["data"], dtype=np.float64)
    assert data.size == int(np.prod(entry["shape"])) and np.isfinite(data).all(), entry["hook_id"]
    assert entry["positions"][1] - entry["positions"][0] == entry["shape"][-2 if entry["component"] in ("residual", "attention", "mlp", "embedding") else 1]
    return data.reshape(entry["shape"])


@needs_model
def test_neuroscope_bridge_writes_valid_files(base_url: str, tmp_path: Path, example: Path) -> None:
    # One layer of circuit hooks and a short prompt keep the files small: the schema check
    # visits every value (about 45 microseconds each).
    prompt = "Sum a list."
    args = ("--base-url", base_url, "--out", str(tmp_path), "--max-tokens", "3", "--layers", "1", "--prompt", prompt)
    out = run_example(example, *args).stdout
    validator = jsonschema.Draft202012Validator(load_schema())
    circuit = json.loads((tmp_path / "circuit.json").read_text(encoding="utf-8"))
    stream = json.loads((tmp_path / "attention_stream.json").read_text(encoding="utf-8"))
    for document in (circuit, stream):
        validator.validate(document)
        assert len(document["generated_tokens"]) == 3 and document["prompt_tokens"], document.keys()
        for entries in document["activations"].values():
            assert [e["step"] for e in entries] == [0, 1, 2]
            for e in entries:
                check_entry(e)
    assert set(circuit["activations"]) == {"embedding", "layers.0.residual", "layers.0.attention", "layers.0.mlp"}
    assert set(stream["activations"]) == {"layers.3.attention_pattern", "layers.3.query"}
    for entry in stream["activations"]["layers.3.attention_pattern"]:
        rows = check_entry(entry).sum(axis=-1)  # sink mass is excluded, so a row sums to at most 1
        assert ((rows > 0) & (rows <= 1 + 1e-5)).all() and len(entry["key_positions"]) == entry["shape"][-1]
    # The streamed file holds what a whole request for the same hooks returns.
    hooks = [{"layer_name": "layers.3", "component": c} for c in ("attention_pattern", "query")]
    whole = NeuroScopeClient(base_url).generate_with_activations(prompt, hooks, max_tokens=3, temperature=0.0)
    assert whole.tokens == stream["generated_tokens"]
    for hook_id, captures in whole.captures.items():
        for capture, entry in zip(captures, stream["activations"][hook_id]):
            np.testing.assert_allclose(check_entry(entry), capture.array, rtol=1e-6, atol=1e-7)
    source = (tmp_path / "NeuroScopeClient-pharo.st").read_text(encoding="utf-8")
    assert "Object subclass: #NeuroScopeMLXClient" in source and base_url in source
    assert "wrote" in out and "layers.0.residual step 2" in out


@needs_model
def test_openai_extra_body_whole_and_streamed_agree(base_url: str, example: Path) -> None:
    out = run_example(example, "--base-url", base_url, "--max-tokens", "4").stdout
    pattern = re.compile(r"^(whole|stream) +step +(\d+) +('.*'|\".*\") layers\.3\.residual shape \[\d+, \d+\] \|last row\| (" + FLOAT + ")$")
    rows: dict[str, list[tuple[int, str, float]]] = {"whole": [], "stream": []}
    for m in filter(None, map(pattern.match, out.splitlines())):
        rows[m[1]].append((int(m[2]), ast.literal_eval(m[3]), float(m[4])))
    assert [r[0] for r in rows["whole"]] == [0, 1, 2, 3] and rows["whole"] == rows["stream"], out
    assert out.rstrip().endswith("whole and streamed captures agree: True")
    tokens, norms = residual_norms(
        base_url, "Write a Python function that reverses a string.", [3], 4
    )
    assert [r[1] for r in rows["whole"]] == tokens
    np.testing.assert_allclose([r[2] for r in rows["whole"]], norms[:, 0], atol=0.00006)  # printed with 4 decimals
