"""The package's shape: no import cycle, no oversized module, a client side without MLX, a light CLI.

The import graph is read from the source with `ast` (every `import` and `from ... import`,
at module level and inside functions, relative ones resolved), so a cycle hidden behind a
function-level import counts too; `graphlib` finds cycles.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_engine"
MAX_MODULE_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "node_modules" not in p.parts}


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that can run: `if TYPE_CHECKING:` bodies are for type checkers only."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and "TYPE_CHECKING" in ast.unparse(test):
                stack.extend(child.orelse)
                continue
            stack.append(child)
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (a `from pkg import sub` that names a module counts as sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycle_inside_the_package() -> None:
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    """The check is not vacuous: two modules importing each other (one inside a function) are a cycle."""
    graph = {"a": {"b"}, "b": {"a"}}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())
    mod = tmp_path / "mlx_engine"
    mod.mkdir()
    (mod / "x.py").write_text("def f():\n    from .y import g\n")
    assert imports_of("mlx_engine.x", mod / "x.py", {"mlx_engine.x", "mlx_engine.y"}) == {"mlx_engine.y"}


def test_no_module_is_oversized() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    big = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


BLOCK_MLX = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoMLX(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mlx" or name.startswith("mlx.") or name.startswith("mlx_lm"):
                raise ImportError(f"{name} is not importable in this test")
            return None

    sys.meta_path.insert(0, NoMLX())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_MLX + textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_client_and_the_wire_codec_need_no_mlx() -> None:
    done = run_python(
        """
        import json
        import numpy as np
        from mlx_engine.integrations.neuroscope.client import NeuroScopeClient, decode_activations
        from mlx_engine.integrations.neuroscope.format import convert_activations_for_neuroscope
        from mlx_engine.wire.codec import decode_capture, encode_array

        wire = {"hook_id": "layers.0.residual", "layer_name": "layers.0", "layer": 0, "component": "residual",
                "step": 0, "positions": [0, 2], "key_positions": None, "is_input": False, "encoding": "base64",
                **encode_array(np.arange(6, dtype=np.float32).reshape(2, 3), "base64")}
        (capture,) = decode_activations({"layers.0.residual": [wire]})["layers.0.residual"]
        assert capture.array.tolist() == [[0, 1, 2], [3, 4, 5]], capture.array
        assert NeuroScopeClient("http://127.0.0.1:1").base_url == "http://127.0.0.1:1"
        assert not any(m == "mlx" or m.startswith(("mlx.", "mlx_lm")) for m in sys.modules)
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_mlx_block_really_blocks() -> None:
    done = run_python("import mlx.core\n")
    assert done.returncode != 0 and "not importable in this test" in done.stderr


def test_the_command_line_parser_imports_nothing_heavy() -> None:
    """`mlx-engine --help` builds every parser: none may pull in MLX, numpy, Flask or transformers."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys, mlx_engine.cli as c; c.build_parser(); "
         "print(sorted(m for m in ('mlx', 'numpy', 'flask', 'transformers', 'torch', 'PIL') if m in sys.modules))"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_and_did_you_mean() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, COLUMNS="200")
        return subprocess.run([sys.executable, "-m", "mlx_engine.cli", *args], capture_output=True, text=True, timeout=120, env=env)

    from mlx_engine import __version__

    assert cli("--version").stdout.strip() == f"mlx-engine {__version__}"
    wrong = cli("serv")
    assert wrong.returncode == 2 and "did you mean 'serve'" in wrong.stderr
    flag = cli("serve", "--portt", "9")
    assert flag.returncode == 2 and "did you mean '--port'" in flag.stderr
    assert "abbrev" not in cli("serve", "--por", "9").stderr and cli("serve", "--por", "9").returncode == 2
    help_text = cli("serve", "--help").stdout
    for default in ("(default: 127.0.0.1)", "(default: 8080)", "(default: 1024.0)", "(default: 4096)", "(default: 16)"):
        assert default in help_text, default
