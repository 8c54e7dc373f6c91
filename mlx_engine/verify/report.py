"""The verdict of `verify`: a row per component and layer, greedy-token agreement, stated tolerances.

A row passes when every element of every step's capture satisfies
|ours - reference| <= atol + rtol * |reference| (numpy's allclose); its relative
difference is the largest absolute difference over the reference's largest magnitude.
The report passes when every row with a reference passes and the greedy tokens agree.
Plain data (no MLX, no torch), so it can be printed, serialised or asserted on anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# Stated tolerances by the dtype our model computes in. float32 on both sides agrees to
# rounding; a half-precision model against a float32 reference differs by its own rounding.
TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-4, 1e-4), "float16": (5e-2, 5e-2), "bfloat16": (1e-1, 1e-1)}

# Where each (component, is_input) is computed inside a block, first to last.
FORWARD_ORDER: dict[tuple[str, bool], int] = {
    key: i
    for i, key in enumerate(
        [("residual", True), ("layernorm", True), ("layernorm", False), ("attention", True), ("query", False),
         ("key", False), ("value", False), ("attention_scores", False), ("attention_pattern", False), ("z", False),
         ("attention_pre_norm", False), ("attention", False), ("resid_mid", False), ("mlp", True), ("router", False),
         ("mlp_pre", False), ("mlp_post", False), ("mlp_pre_norm", False), ("mlp", False), ("residual", False)]
    )
}



@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    dtype: str = "float32"


@dataclass
class Row:
    """One component at one layer (or the embedding / final norm), over every step compared."""

    component: str
    layer: Optional[int]
    is_input: bool
    steps: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    ok: bool = True
    has_reference: bool = True
    notes: list[str] = field(default_factory=list)
    first_bad_step: Optional[int] = None

    def add(self, diff: Optional[tuple[float, float, bool, str]], step: int) -> None:
        if diff is None:
            self.has_reference = False
            return
        max_abs, max_rel, within, note = diff
        self.steps += 1
        self.max_abs, self.max_rel = max(self.max_abs, max_abs), max(self.max_rel, max_rel)
        if not within:
            self.ok = False
            self.first_bad_step = step if self.first_bad_step is None else self.first_bad_step
        if note and note not in self.notes:
            self.notes.append(note)

    @property
    def name(self) -> str:
        """The hook id of the site: `embedding`, `final_norm`, `layers.3.mlp`, `layers.3.mlp.input`."""
        if self.layer is None:
            return "final_norm" if self.component == "layernorm" else self.component
        return f"layers.{self.layer}.{self.component}" + (".input" if self.is_input else "")

    def order(self) -> tuple[int, int, int]:
        """Forward order: the first failing row is where the two models part."""
        if self.layer is None:
            return (0 if self.component == "embedding" else 2, 0, 0)
        site = FORWARD_ORDER.get((self.component, self.is_input), len(FORWARD_ORDER))
        return (1, self.layer, site)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "component": self.component, "layer": self.layer, "is_input": self.is_input,
            "steps": self.steps, "max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok,
            "has_reference": self.has_reference, "first_bad_step": self.first_bad_step, "notes": self.notes,
        }


@dataclass
class VerifyReport:
    model_id: str
    model_type: str
    native: bool
    prompt_tokens: int
    generated: list[int]
    reference_tokens: list[int]
    rows: list[Row]
    tolerance: Tolerance
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_agree(self) -> bool:
        return self.generated == self.reference_tokens[: len(self.generated)]

    @property
    def failures(self) -> list[Row]:
        """Rows beyond the tolerance, in forward order (the first is where the models part)."""
        return [r for r in self.rows if r.has_reference and not r.ok]

    @property
    def unchecked(self) -> list[Row]:
        return [r for r in self.rows if not r.has_reference]

    @property
    def passed(self) -> bool:
        return not self.failures and self.tokens_agree and any(r.has_reference for r in self.rows)

    def verdict(self) -> str:
        tol = f"atol {self.tolerance.atol:g}, rtol {self.tolerance.rtol:g} ({self.tolerance.dtype})"
        if self.passed:
            return f"PASS: every compared tensor within {tol}; greedy tokens agree."
        parts = []
        if self.failures:
            names = ", ".join(r.name for r in self.failures[:8]) + (", ..." if len(self.failures) > 8 else "")
            parts.append(f"{len(self.failures)} tensor(s) beyond {tol}, first {self.failures[0].name}: {names}")
        if not self.tokens_agree:
            step = next(i for i, (a, b) in enumerate(zip(self.generated, self.reference_tokens)) if a != b)
            parts.append(f"greedy tokens differ from step {step}")
        if not any(r.has_reference for r in self.rows):
            parts.append("nothing could be compared")
        return "FAIL: " + "; ".join(parts) + "."

    def to_text(self) -> str:
        head = (
            f"verify {self.model_id} ({self.model_type}, {'native' if self.native else 'mlx-lm fallback'}) against "
            f"transformers float32 eager: {self.prompt_tokens} prompt tokens, {max(len(self.generated) - 1, 0)} decode steps"
        )
        lines = [head]
        if self.config_overrides:
            lines.append(f"loaded with config_overrides {self.config_overrides} (the reference reads config.json as written)")
        lines.append(f"{'tensor':32s} {'steps':>5s} {'max abs':>10s} {'max rel':>10s}  result")
        for r in self.rows:
            result = "no reference" if not r.has_reference else ("ok" if r.ok else f"FAIL (from step {r.first_bad_step})")
            note = f"  [{'; '.join(r.notes)}]" if r.notes else ""
            lines.append(f"{r.name:32s} {r.steps:5d} {r.max_abs:10.2e} {r.max_rel:10.2e}  {result}{note}")
        lines.append(f"greedy tokens: ours {self.generated}, transformers {self.reference_tokens[: len(self.generated)]} "
                     f"({'agree' if self.tokens_agree else 'DIFFER'})")
        lines.append(self.verdict())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id, "model_type": self.model_type, "native": self.native,
            "prompt_tokens": self.prompt_tokens, "generated": self.generated,
            "reference_tokens": self.reference_tokens[: len(self.generated)], "tokens_agree": self.tokens_agree,
            "tolerance": {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol, "dtype": self.tolerance.dtype},
            "config_overrides": self.config_overrides, "passed": self.passed, "verdict": self.verdict(),
            "rows": [r.to_dict() for r in self.rows],
        }
