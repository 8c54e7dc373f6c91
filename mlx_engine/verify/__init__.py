"""`verify`: prove a loaded model equal to transformers on this machine, component by component.

    report = mlx_engine.verify(kit, prompt="def f(x):", tokens=4)
    print(report.to_text()); assert report.passed

The reference is the same checkpoint folder in transformers (float32, eager attention;
an MLX-quantized checkpoint gets our weights dequantized). torch and transformers come
from the optional extra `verify` (`pip install "mlx-engine[verify]"`); this module
imports them only when `verify` runs.

`mlx_engine.verify` is this package or its `verify` function depending on what was
imported first (a package attribute and a submodule share the name), so the package is
made callable: both spellings run the same function.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ..loading import ModelKit
    from .report import VerifyReport

DEFAULT_PROMPT = "def encode(self, obj):\n    return json.dumps(obj, indent=4)\n"
DEFAULT_TOKENS = 4
INSTALL_HINT = 'pip install "mlx-engine[verify]"'


class MissingVerifyDependencies(RuntimeError):
    """torch or transformers is not installed; the message says how to install them."""


def require_reference() -> None:
    """Raise MissingVerifyDependencies unless torch and transformers import."""
    missing = []
    for name in ("torch", "transformers"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingVerifyDependencies(
            f"verify compares with transformers and needs {' and '.join(missing)}, which is not installed: {INSTALL_HINT}"
        )


def _tolerance(kit: "ModelKit", atol: Optional[float], rtol: Optional[float]) -> Any:
    """The stated tolerance for the dtype the model computes in (its first float parameter's)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .report import TOLERANCES, Tolerance

    names = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
    dtype = next((names[v.dtype] for _, v in tree_flatten(kit.model.parameters()) if v.dtype in names), "float32")
    default_atol, default_rtol = TOLERANCES[dtype]
    return Tolerance(default_atol if atol is None else atol, default_rtol if rtol is None else rtol, dtype)


def verify(
    kit: "ModelKit",
    prompt: str = DEFAULT_PROMPT,
    tokens: int = DEFAULT_TOKENS,
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    reference: Any = None,
) -> "VerifyReport":
    """Compare every component `kit` offers, at every layer, over `prompt` and `tokens` greedy decode
    steps, with transformers' forward on the same checkpoint; return the report (`.passed`, `.to_text()`).

    Tolerances default by the model's dtype (report.TOLERANCES). `reference` may be a transformers
    model already built for the same weights (the tests' way to skip loading it twice).
    """
    require_reference()
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    from ..loading import tokenize
    from .compare import compare

    ids = tokenize(kit, prompt)
    if not ids:
        raise ValueError("the prompt tokenizes to nothing; give some text")
    return compare(kit, ids, tokens, _tolerance(kit, atol, rtol), reference)


class _CallableModule(types.ModuleType):
    def __call__(self, kit: "ModelKit", *args: Any, **kwargs: Any) -> "VerifyReport":
        return verify(kit, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
