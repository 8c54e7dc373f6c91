"""Direct logit attribution (DLA) of a logit difference between a target and a foil token.

The final residual at a position is the sum of what was written into it: the embedding,
then each layer's attention and MLP outputs; an attention output is the sum of its heads,
head h contributing W_O[:, h] @ z_h, plus the output projection's bias ("attention bias").
With the final norm frozen at its scale on the real final residual (Elhage et al. 2021;
TransformerLens' `apply_ln_to_stack`; see unembed.py) the logit difference is linear in the
residual, so each term contributes `term . u` with u = P(g * (W_U[target] - W_U[foil])) / scale.
A LayerNorm's bias and a head's bias add constant terms. The terms sum to the model's own
pre-cap logit difference; `residual_error` is what they miss (float32 rounding: within
`SUM_TOLERANCE` of the terms' magnitude, which the tests check).

Soft-capped models: DLA attributes the difference before the cap (the cap is not linear).
Sandwich-norm models (Gemma 2/3, OLMo 2) normalise each sublayer's output after the output
projection, so heads are not attributed there, only whole sublayers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..generation.api import run_with_cache
from ..loading import ModelKit
from .common import Token, check_position, prompt_tokens, resolve_token, to_numpy, token_strings
from .unembed import output_projection, unembedding

SUM_TOLERANCE = 1e-4  # |sum of terms - total| <= SUM_TOLERANCE * (1 + sum |terms|)


@dataclass
class Attribution:
    """Direct logit attribution at one position; per-layer arrays are [layers], heads [layers, heads]."""

    tokens: list[int]
    token_strings: list[str]
    position: int
    target: int
    foil: int
    target_string: str
    foil_string: str
    total: float  # the model's own logit(target) - logit(foil), before any soft-cap
    embedding: float
    attention: np.ndarray  # [L]
    mlp: np.ndarray  # [L]
    heads: Optional[np.ndarray]  # [L, H]; None where heads cannot be attributed
    attention_bias: np.ndarray  # [L]
    constants: dict[str, float] = field(default_factory=dict)  # final-norm bias, unembedding bias
    residual_error: float = 0.0  # total - sum of the terms

    @property
    def sum_of_terms(self) -> float:
        return float(self.embedding + self.attention.sum() + self.mlp.sum() + sum(self.constants.values()))

    def terms(self) -> list[dict[str, Any]]:
        """Every term as one row, largest magnitude first: a ranked table."""
        rows: list[dict[str, Any]] = [{"name": "embedding", "kind": "embedding", "layer": None, "head": None, "value": self.embedding}]
        for layer in range(len(self.attention)):
            rows.append({"name": f"L{layer} attention", "kind": "attention", "layer": layer, "head": None, "value": float(self.attention[layer])})
            rows.append({"name": f"L{layer} mlp", "kind": "mlp", "layer": layer, "head": None, "value": float(self.mlp[layer])})
            if self.heads is not None:
                for head, value in enumerate(self.heads[layer]):
                    rows.append({"name": f"L{layer}H{head}", "kind": "head", "layer": layer, "head": head, "value": float(value)})
                rows.append({"name": f"L{layer} attention bias", "kind": "attention_bias", "layer": layer, "head": None,
                             "value": float(self.attention_bias[layer])})
        for name, value in self.constants.items():
            rows.append({"name": name, "kind": "constant", "layer": None, "head": None, "value": value})
        return sorted(rows, key=lambda r: -abs(r["value"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_strings": self.token_strings,
            "position": self.position,
            "target": self.target,
            "foil": self.foil,
            "target_string": self.target_string,
            "foil_string": self.foil_string,
            "total": self.total,
            "sum_of_terms": self.sum_of_terms,
            "residual_error": self.residual_error,
            "sum_tolerance": SUM_TOLERANCE,
            "embedding": self.embedding,
            "attention": self.attention.tolist(),
            "mlp": self.mlp.tolist(),
            "heads": None if self.heads is None else self.heads.tolist(),
            "attention_bias": self.attention_bias.tolist(),
            "constants": self.constants,
            "terms": self.terms(),
        }


def attribution_hooks(kit: ModelKit, heads: bool) -> list[dict[str, Any]]:
    hooks: list[dict[str, Any]] = [{"layer_name": "embedding", "component": "embedding"}]
    for i in range(kit.arch_info.num_layers):
        hooks += [{"layer_name": i, "component": c} for c in ("attention", "mlp", "residual")]
        if heads:
            hooks.append({"layer_name": i, "component": "z"})
    return hooks


def heads_attributable(kit: ModelKit) -> bool:
    """Whether attention outputs split into heads through the output projection (native, no post-norm)."""
    return kit.native and not kit.arch_info.post_norms


def default_target_foil(kit: ModelKit, text_or_tokens: Union[str, Sequence[int]], position: int = -1) -> tuple[int, int]:
    """The model's two most likely next tokens at `position`: a target and foil when none are given."""
    tokens = prompt_tokens(kit, text_or_tokens)
    p = check_position(position, len(tokens))
    logits = to_numpy(run_with_cache(kit, tokens[: p + 1]).logits[-1])
    first, second = np.argsort(-logits, kind="stable")[:2]
    return int(first), int(second)


def direct_logit_attribution(
    kit: ModelKit, text_or_tokens: Union[str, Sequence[int]], target: Token, foil: Token, *, position: int = -1
) -> Attribution:
    """DLA of logit(target) - logit(foil) at `position` (default: the last) of a prompt."""
    tokens = prompt_tokens(kit, text_or_tokens)
    p = check_position(position, len(tokens))
    t, f = resolve_token(kit, target), resolve_token(kit, foil)
    by_head = heads_attributable(kit)
    cache = run_with_cache(kit, tokens, attribution_hooks(kit, by_head))
    unembed = unembedding(kit)
    n_layers = kit.arch_info.num_layers

    def row(hook_id: str) -> np.ndarray:
        return to_numpy(cache[hook_id][p])

    final = row(f"layers.{n_layers - 1}.residual")
    norm = unembed.linearised_norm(final)
    w_target, w_foil = unembed.rows([t, f])
    u = norm.direction(w_target - w_foil)
    constants: dict[str, float] = {}
    if norm.bias is not None:
        constants["final norm bias"] = float(norm.bias @ (w_target - w_foil))
    head_bias = unembed.head_bias([t, f])
    if head_bias is not None:
        constants["unembedding bias"] = float(head_bias[0] - head_bias[1])

    attention = np.array([row(f"layers.{i}.attention") @ u for i in range(n_layers)])
    mlp = np.array([row(f"layers.{i}.mlp") @ u for i in range(n_layers)])
    heads, bias_terms = None, np.zeros(n_layers)
    if by_head:
        info = kit.arch_info
        heads = np.zeros((n_layers, info.n_heads))
        for i in range(n_layers):
            w_o, b_o = output_projection(kit, i)
            z = to_numpy(cache[f"layers.{i}.z"][:, p, :])  # [H, head_dim]
            per_head = w_o.reshape(w_o.shape[0], info.n_heads, info.head_dim)  # [d, H, head_dim]
            heads[i] = np.einsum("dhk,hk,d->h", per_head, z, u)
            bias_terms[i] = 0.0 if b_o is None else float(b_o @ u)
    raw = to_numpy(unembed.raw_logits(cache[f"layers.{n_layers - 1}.residual"][p : p + 1]))[0]
    total = float(raw[t] - raw[f])
    result = Attribution(
        tokens=tokens,
        token_strings=token_strings(kit, tokens),
        position=p,
        target=t,
        foil=f,
        target_string=token_strings(kit, [t])[0],
        foil_string=token_strings(kit, [f])[0],
        total=total,
        embedding=float(row("embedding") @ u),
        attention=attention,
        mlp=mlp,
        heads=heads,
        attention_bias=bias_terms,
        constants=constants,
    )
    result.residual_error = total - result.sum_of_terms
    return result
