"""The generated Amber client filed into real Amber Smalltalk on Node, its SUnit tests run
against a real server. A failing SUnit test fails these tests.

Needs Node.js and npm; the pinned Amber packages are installed with `npm ci` on first use
(`.ci/run` installs them up front). Without Node the tests report themselves skipped.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from neuroscope_server import research_roots, running_server

import mlx_engine.integrations.neuroscope as neuroscope
from mlx_engine.integrations.neuroscope.smalltalk import (
    CLIENT_CLASS,
    COMPAT_CLASS,
    TEST_CLASS,
    client_classes,
    generate_smalltalk_client,
)
from mlx_engine.integrations.neuroscope.smalltalk_dialects import AMBER

AMBER_DIR = Path(neuroscope.__file__).resolve().parent / "amber"
RUNNER = AMBER_DIR / "run-sunit.js"


@functools.lru_cache(maxsize=None)
def amber_node() -> str:
    """Node's path, after installing Amber's pinned packages if they are not there yet."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js and npm are not installed: the Amber client cannot run here")
    if not (AMBER_DIR / "node_modules" / "@ambers" / "lang").is_dir():
        done = subprocess.run([npm, "ci", "--prefix", str(AMBER_DIR)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"`npm ci --prefix {AMBER_DIR}` failed:\n{done.stdout}{done.stderr}")
    return node


def run_amber(sources: list[Path], tests: tuple[str, ...] = (), describe: tuple[str, ...] = ()) -> tuple[int, dict[str, Any], str]:
    """Run the Amber SUnit runner; its exit status, JSON summary and whole output."""
    node = amber_node()
    command = [node, str(RUNNER)]
    for source in sources:
        command += ["--source", str(source)]
    for name in tests:
        command += ["--test", name]
    for name in describe:
        command += ["--describe", name]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    summary = json.loads(done.stdout.splitlines()[0]) if done.stdout.strip() else {}
    return done.returncode, summary, output


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default model, with the store and SAE the research tests read (and extraction jobs write beside)."""
    stores, saes = research_roots(tmp_path_factory.mktemp("research"))
    with running_server(store_root=stores, sae_roots=(saes,)) as url:
        yield url


@pytest.fixture(scope="module")
def amber_source(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("amber") / "neuroscope-client.st"
    path.write_text(generate_smalltalk_client("amber", base_url), encoding="utf-8")
    return path


def test_file_in_defines_every_generated_method(amber_source: Path) -> None:
    status, summary, output = run_amber([amber_source], describe=(CLIENT_CLASS, COMPAT_CLASS, TEST_CLASS))
    assert status == 0, output
    assert summary["filed_in"] is True
    for spec in client_classes(AMBER, "http://unused"):
        compiled = summary["classes"][spec.name]
        assert sorted(m.selector for m in spec.methods if not m.class_side) == compiled["instance"]
        assert sorted(m.selector for m in spec.methods if m.class_side) == compiled["class"]


def test_a_method_amber_cannot_compile_fails_the_file_in(amber_source: Path, tmp_path: Path) -> None:
    text = amber_source.read_text(encoding="utf-8")
    broken = tmp_path / "broken.st"
    broken.write_text(text.replace("^ '?model=' , model", "^ '?model=' , model )", 1), encoding="utf-8")
    status, summary, output = run_amber([broken], describe=(CLIENT_CLASS,))
    assert status == 2, output
    assert summary["filed_in"] is False and "Parse error" in summary["error"]
    undefined = tmp_path / "undefined.st"
    undefined.write_text(text.replace("newList\n\t^ Array new", "newList\n\t^ arrayClass new", 1), encoding="utf-8")
    status, summary, output = run_amber([undefined], describe=(CLIENT_CLASS,))
    assert status == 2 and "arrayClass is not defined" in summary["error"], output


def test_amber_sunit_tests_pass_against_the_server(amber_source: Path) -> None:
    status, summary, output = run_amber([amber_source], tests=(TEST_CLASS,))
    test_selectors = [m.selector for m in client_classes(AMBER, "http://unused")[2].methods if m.selector.startswith("test")]
    assert summary.get("runs") == len(test_selectors) >= 7, output
    assert summary["errors"] == [] and summary["failures"] == [], output
    assert status == 0, output
    assert f"{len(test_selectors)} passed, 0 failed" in output


def test_a_failing_sunit_test_is_reported(amber_source: Path, tmp_path: Path) -> None:
    text = amber_source.read_text(encoding="utf-8")
    wrong = "self assert: (health at: 'status') equals: 'degraded'"
    mutated = tmp_path / "mutated.st"
    mutated.write_text(text.replace("self assert: (health at: 'status') equals: 'ok'", wrong, 1), encoding="utf-8")
    assert wrong in mutated.read_text(encoding="utf-8")
    status, summary, output = run_amber([mutated], tests=(TEST_CLASS,))
    assert status == 1, output
    assert summary["failures"] == [f"{TEST_CLASS}>>#testHealth"], output
    assert summary["passed"] == summary["runs"] - 1
