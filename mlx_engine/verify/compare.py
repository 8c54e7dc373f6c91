"""Our model with every offered component hooked, against the transformers reference, per component and layer.

Our run captures every component the model offers (inputs too) over the prompt and
`tokens` greedy decode steps. The reference runs one forward over the prompt plus the
generated tokens but the last; the captures of decode step k are compared with its row
k of that forward. Scores are compared where the reference allows the key (masked ones
must be -inf in ours); probabilities over the key columns we report, with no mass on the
columns we leave out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .report import Row, Tolerance, VerifyReport
from .reference import Recorder, load_reference

if TYPE_CHECKING:
    from ..loading import ModelKit

# (component, is_input) -> the reference tensor it equals
REF_KEY: dict[tuple[str, bool], str] = {
    ("residual", False): "residual",
    ("residual", True): "resid_pre",
    ("attention", False): "attention",
    ("attention", True): "attention_in",
    ("mlp", False): "mlp",
    ("mlp", True): "mlp_in",
    ("layernorm", False): "layernorm",
    ("layernorm", True): "resid_pre",
    **{(c, False): c for c in ("query", "key", "value", "z", "router", "resid_mid", "mlp_pre", "mlp_post",
                               "attention_pre_norm", "mlp_pre_norm", "attention_scores", "attention_pattern")},
}
HEAD_AXIS = ("query", "key", "value", "z", "attention_scores", "attention_pattern")
# Each token's k routed experts are compared with transformers' expert computation in the test suite.
NOT_COMPARED = ("expert_pre", "expert_post")


def every_hook(kit: "ModelKit") -> list[dict[str, Any]]:
    """A request for every component the model offers at every layer, inputs included."""
    from ..hooks.listing import describe_hook_points

    listing = describe_hook_points(kit)
    hooks: list[dict[str, Any]] = [{"layer_name": "embedding"}, {"layer_name": "final_norm", "component": "layernorm"}]
    for layer in listing["layers"]:
        for component, desc in layer["components"].items():
            if component in NOT_COMPARED:
                continue
            hooks.append({"layer_name": layer["name"], "component": component})
            if desc["supports_input"]:
                hooks.append({"layer_name": layer["name"], "component": component, "capture_input": True, "capture_output": False})
    return hooks


# An mlx-lm fallback model's attention and mlp are its sublayer modules' outputs: with sandwich
# norms (OLMo 2/3 through mlx-lm) those come before the post-norms, unlike a native model's.
FALLBACK_SANDWICH_NOTE = "mlx-lm fallback with sandwich norms: the sublayer output before its post-norm"


def _ref_key(capture: Any, ref: dict[str, np.ndarray], native: bool) -> str:
    key = f"{capture.layer}.{REF_KEY.get((capture.component, capture.is_input), '')}"
    if not native and not capture.is_input and f"{key}_pre_norm" in ref:
        return f"{key}_pre_norm"
    return key


def _expected(capture: Any, ref: dict[str, np.ndarray], native: bool) -> Optional[np.ndarray]:
    start, end = capture.positions
    if capture.layer is None:
        full = ref.get(capture.layer_name)
        return None if full is None else full[start:end]
    full = ref.get(_ref_key(capture, ref, native))
    if full is None:
        return None
    return full[:, start:end] if capture.component in HEAD_AXIS else full[start:end]


def _difference(capture: Any, ref: dict[str, np.ndarray], tol: Tolerance, native: bool) -> Optional[tuple[float, float, bool, str]]:
    """(max abs, max relative, within tolerance, note) of one capture, or None without a reference."""
    ours = np.array(capture.array, dtype=np.float32)
    expected = _expected(capture, ref, native)
    if expected is None:
        return None
    ok_extra = True
    note = FALLBACK_SANDWICH_NOTE if capture.layer is not None and _ref_key(capture, ref, native).endswith("_pre_norm") else ""
    if capture.component in ("attention_scores", "attention_pattern"):
        keys = np.array(capture.key_positions)
        start, end = capture.positions
        expected = expected[:, :, keys]
        if capture.component == "attention_scores":
            allowed = ref[f"{capture.layer}.allowed"][:, start:end][:, :, keys]
            if not np.all(np.isneginf(ours[~allowed])):
                ok_extra, note = False, "a masked key has a finite score"
            ours, expected = ours[allowed], expected[allowed]
        else:
            rest = np.setdiff1d(np.arange(ref[f"{capture.layer}.attention_pattern"].shape[-1]), keys)
            leak = np.abs(ref[f"{capture.layer}.attention_pattern"][:, start:end][:, :, rest]).max(initial=0.0)
            if leak > tol.atol:
                ok_extra, note = False, f"the reference puts {leak:.1e} on keys not reported"
    if capture.indices is not None:
        expected = expected[..., capture.indices]
    if ours.shape != expected.shape:
        return float("inf"), float("inf"), False, f"shape {ours.shape} vs reference {expected.shape}"
    diff = np.abs(ours - expected)
    scale = float(np.abs(expected).max(initial=0.0))
    max_abs = float(diff.max(initial=0.0))
    within = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(expected))) and ok_extra
    return max_abs, max_abs / scale if scale else max_abs, within, note


def compare(kit: "ModelKit", prompt_ids: list[int], tokens: int, tol: Tolerance, reference: Any = None) -> VerifyReport:
    """Run both models and compare every capture; `reference` may be a transformers model already loaded."""
    from ..generation.api import create_generator_with_activations

    steps = list(create_generator_with_activations(kit, prompt_ids, every_hook(kit), max_tokens=tokens + 1, temp=0.0))
    generated = [result.token for result, _ in steps]
    ref = Recorder(reference if reference is not None else load_reference(kit)).run(prompt_ids + generated[:-1])

    rows: dict[tuple[str, Optional[int], bool], Row] = {}
    for _, activations in steps:
        for captures in activations.values():
            for capture in captures:
                key = (capture.component, capture.layer, capture.is_input)
                row = rows.setdefault(key, Row(capture.component, capture.layer, capture.is_input))
                row.add(_difference(capture, ref, tol, kit.native), capture.step)
    expected_tokens = ref["logits"][len(prompt_ids) - 1 :].argmax(-1).tolist()
    return VerifyReport(
        model_id=kit.model_id,
        model_type=kit.model_type,
        native=kit.native,
        prompt_tokens=len(prompt_ids),
        generated=generated,
        reference_tokens=expected_tokens,
        rows=sorted(rows.values(), key=Row.order),
        tolerance=tol,
        config_overrides=dict(kit.config_overrides),
    )
