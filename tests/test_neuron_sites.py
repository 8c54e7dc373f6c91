"""The neuron-level capture sites equal what transformers computes, prompt and decode.

Sites: `mlp_pre` / `mlp_post` (a dense MLP's pre-activation and the hidden units entering
its down projection), `resid_mid` (the residual stream between attention and MLP) and,
for gpt-oss, `expert_pre` / `expert_post` (the routed experts' hidden units, one row per
expert in capture.extras["experts"] order). Also: the `topk` intervention, feature
subsets (`indices`), the TransformerLens aliases and the capture budget for these sites.

The reference is transformers (float32, eager attention) on the same weights, read with
torch forward hooks and forward pre-hooks on its modules; gpt-oss expert tensors are
computed from the experts module's own parameters and its `_apply_gate`. Tolerances:
atol = rtol = 1e-4 against transformers (float32 on both sides, activations O(1)-O(10));
1e-6 (absolute) where the engine is compared with itself through an edit that should
change nothing; exact where a capture is compared with a slice of another capture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

import mlx_engine
import tiny_checkpoints as tc
from test_hooks_equivalence import ARCHS, PROMPT, dequantized_gpt_oss_reference

ATOL = 1e-4
RTOL = 1e-4
SELF_ATOL = 1e-6  # the engine against itself through a no-op edit
DECODE_STEPS = 4  # captures of the prompt plus 3 decode steps
LAYER = 1  # the middle layer of every tiny checkpoint (3 or 4 layers)
SUBSET = [3, 0, 7]
MOE = ("gpt_oss", "gpt_oss_4bit")
DENSE = tuple(sorted(set(ARCHS) - set(MOE)))


# --------------------------------------------------------------------------- fixtures


class Built:
    """One architecture: our kit, the transformers reference and the pieces the tests need."""

    def __init__(self, name: str, root: Path) -> None:
        build, cls_name, _ = ARCHS[name]
        path, _ = build(root)
        self.name = name
        self.kit = mlx_engine.load_model(path)
        if name == "gpt_oss_4bit":
            assert self.kit.config["quantization"]["bits"] == 4
            self.reference = dequantized_gpt_oss_reference(self.kit, root / "float")
        else:
            self.reference = tc.load_reference(path, cls_name)
        self.reference.config._attn_implementation = "eager"
        self.ids = mlx_engine.tokenize(self.kit, PROMPT)
        self.moe = name in MOE
        info = self.kit.arch_info
        self.d_mlp, self.d_model, self.k = info.d_mlp, info.d_model, info.experts_per_token

    @property
    def neuron_sites(self) -> tuple[str, str]:
        return ("expert_pre", "expert_post") if self.moe else ("mlp_pre", "mlp_post")

    @property
    def sites(self) -> tuple[str, str, str]:
        return (*self.neuron_sites, "resid_mid")

    def width(self, component: str) -> int:
        return self.d_model if component == "resid_mid" else self.d_mlp


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    """Each checkpoint is built (and its reference loaded) once for the whole module."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = Built(name, tmp_path_factory.mktemp(f"neurons_{name}"))
        return cache[name]

    return get


# --------------------------------------------------------------------------- the reference


def _blocks(model: Any) -> list[Any]:
    return list(model.transformer.h) if hasattr(model, "transformer") else list(model.model.layers)


def _modules(block: Any) -> tuple[Any, Any, Any, Any]:
    """(module whose output is mlp_pre, module whose input is mlp_post, module whose input
    is resid_mid, the experts module or None)."""
    if hasattr(block, "ln_2"):  # GPT-2: c_fc -> act -> c_proj
        return block.mlp.c_fc, block.mlp.c_proj, block.ln_2, None
    if hasattr(block.mlp, "experts"):
        return None, None, block.post_attention_layernorm, block.mlp.experts
    return block.mlp.gate_proj, block.mlp.down_proj, block.post_attention_layernorm, None


def _input(args: tuple, kwargs: dict, position: int = 0, name: str = "hidden_states") -> torch.Tensor:
    if len(args) > position:
        return args[position]
    return kwargs[name]


def torch_keep_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but its k largest-magnitude features (last axis) zeroed."""
    keep = torch.topk(x.abs(), k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, keep, torch.gather(x, -1, keep))


def numpy_keep_top_k(x: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-np.abs(x), axis=-1)[..., :k]
    out = np.zeros_like(x)
    np.put_along_axis(out, keep, np.take_along_axis(x, keep, axis=-1), axis=-1)
    return out


def reference_forward(b: Built, ids: list[int], topk_post: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
    """One transformers forward over `ids` recording, per layer i: `{i}.mlp_pre`, `{i}.mlp_post`,
    `{i}.resid_mid` (dense) or `{i}.resid_mid`, `{i}.experts_in`, `{i}.router_indices` (gpt-oss);
    and `logits`. `topk_post=(layer, k)` keeps the k largest |x| of mlp_post (the down
    projection's input; gpt-oss: each expert's `_apply_gate` output) at that layer."""
    store: dict[str, np.ndarray] = {}
    handles = []
    patched: list[Any] = []

    def save_output(key: str):
        def hook(module: Any, args: tuple, output: Any) -> None:
            store[key] = output.detach()[0].float().numpy()

        return hook

    def save_input(key: str, edit_k: Optional[int] = None):
        def hook(module: Any, args: tuple, kwargs: dict) -> Any:
            x = _input(args, kwargs)
            if edit_k is not None:
                assert args, "the edited module must receive its input positionally"
                x = torch_keep_top_k(x, edit_k)
                args = (x, *args[1:])
            store[key] = x.detach()[0].float().numpy()
            return (args, kwargs) if edit_k is not None else None

        return hook

    def save_experts(i: int):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            store[f"{i}.experts_in"] = _input(args, kwargs).detach().float().numpy()  # [T, d_model]
            store[f"{i}.router_indices"] = _input(args, kwargs, 1, "router_indices").detach().numpy()  # [T, k]

        return hook

    for i, block in enumerate(_blocks(b.reference)):
        pre, post, norm2, experts = _modules(block)
        edit_k = topk_post[1] if topk_post is not None and topk_post[0] == i else None
        handles.append(norm2.register_forward_pre_hook(save_input(f"{i}.resid_mid"), with_kwargs=True))
        if experts is None:
            handles.append(pre.register_forward_hook(save_output(f"{i}.mlp_pre")))
            handles.append(post.register_forward_pre_hook(save_input(f"{i}.mlp_post", edit_k), with_kwargs=True))
        else:
            handles.append(experts.register_forward_pre_hook(save_experts(i), with_kwargs=True))
            if edit_k is not None:
                gate = experts._apply_gate
                experts._apply_gate = lambda gate_up, gate=gate, k=edit_k: torch_keep_top_k(gate(gate_up), k)
                patched.append(experts)
    try:
        with torch.no_grad():
            out = b.reference(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
        for experts in patched:
            del experts._apply_gate  # the instance attribute; the class method shows again
    store["logits"] = out.logits[0].float().numpy()
    return store


def expected_experts(b: Built, layer: int, h: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' gate pre-activation and `_apply_gate` output [T, k, d_expert] for the
    experts `chosen` [T, k] of each row of the experts' input h [T, d_model]."""
    experts = _blocks(b.reference)[layer].mlp.experts
    ids = torch.from_numpy(chosen.astype(np.int64))
    with torch.no_grad():
        w = experts.gate_up_proj[ids]  # [T, k, d_model, 2I]
        gate_up = torch.einsum("td,tkdi->tki", torch.from_numpy(h), w) + experts.gate_up_proj_bias[ids]
        return gate_up[..., ::2].numpy(), experts._apply_gate(gate_up).numpy()


def neuron_hooks(b: Built) -> list[dict[str, Any]]:
    return [{"layer_name": i, "component": c} for i in range(b.kit.arch_info.num_layers) for c in b.sites]


def check_capture(b: Built, capture: Any, ref: dict[str, np.ndarray]) -> None:
    """One capture against the matching rows of the reference forward."""
    ours = np.array(capture.array, dtype=np.float32)
    start, end = capture.positions
    i, comp = capture.layer, capture.component
    what = f"{b.name} {capture.hook_id} step {capture.step} rows {start}:{end}"
    if comp in ("expert_pre", "expert_post"):
        chosen = np.array(capture.extras["experts"])
        assert chosen.shape == (end - start, b.k) and ours.shape == (end - start, b.k, b.d_mlp), what
        # Our routing is transformers' top-k set, token by token.
        theirs = ref[f"{i}.router_indices"][start:end]
        assert np.array_equal(np.sort(chosen, axis=-1), np.sort(theirs, axis=-1)), what
        pre, post = expected_experts(b, i, ref[f"{i}.experts_in"][start:end], chosen)
        expected = pre if comp == "expert_pre" else post
    else:
        expected = ref[f"{i}.{comp}"][start:end]
        assert ours.shape == (end - start, b.width(comp)), what
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)


# --------------------------------------------------------------------------- 1. equivalence


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_neuron_sites_match_transformers_prompt_and_decode(built, name: str) -> None:
    b = built(name)
    ids = b.ids
    if b.moe:
        # 32 prompt tokens x 2 experts reach SwitchGLU's expert-sorted path (>= 64 rows); the
        # decode steps take the unsorted one: both orders are checked.
        assert len(ids) * b.k >= 64
    hooks = neuron_hooks(b)
    steps = list(mlx_engine.create_generator_with_activations(b.kit, ids, hooks, max_tokens=DECODE_STEPS))
    generated = [r.token for r, _ in steps]
    ref = reference_forward(b, ids + generated[:-1])
    seen = set()
    expected_ids = {f"layers.{h['layer_name']}.{h['component']}" for h in hooks}
    for result, activations in steps:
        assert set(activations) == expected_ids
        for captures in activations.values():
            for capture in captures:
                assert capture.step == result.step
                check_capture(b, capture, ref)
                seen.add((capture.step, capture.positions))
    assert {s for s, _ in seen} == set(range(DECODE_STEPS))
    covered = sorted(p for _, p in seen)
    assert covered[0][0] == 0 and covered[-1][1] == len(ids) + DECODE_STEPS - 1
    # The tokens are the reference's greedy choices: the reference ran on the same stream.
    assert generated == ref["logits"][len(ids) - 1 :].argmax(-1).tolist()


# --------------------------------------------------------------------------- 2. topk


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_topk_with_every_feature_changes_nothing(built, name: str) -> None:
    b = built(name)
    plain = np.array(mlx_engine.run_with_cache(b.kit, b.ids).logits)
    for component in b.sites:
        edit = {"layer_name": LAYER, "component": component, "op": "topk", "k": b.width(component)}
        edited = np.array(mlx_engine.run_with_cache(b.kit, b.ids, interventions=[edit]).logits)
        np.testing.assert_allclose(edited, plain, atol=SELF_ATOL, rtol=0, err_msg=f"{name} {component}")


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_topk_one_keeps_the_largest_magnitude_feature(built, name: str) -> None:
    """The captures before and after a k=1 edit at the same site: after = top-1 of before."""
    b = built(name)
    for component in b.sites:
        hooks = [
            {"layer_name": LAYER, "component": component, "edit": "before", "hook_id": "before"},
            {"layer_name": LAYER, "component": component, "edit": "after", "hook_id": "after"},
        ]
        edit = {"layer_name": LAYER, "component": component, "op": "topk", "k": 1}
        out = mlx_engine.run_with_cache(b.kit, b.ids, hooks, interventions=[edit])
        before, after = np.array(out["before"]), np.array(out["after"])
        np.testing.assert_array_equal(after, numpy_keep_top_k(before, 1), err_msg=f"{name} {component}")
        assert np.count_nonzero(after.reshape(-1, after.shape[-1]), axis=-1).max() == 1


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_topk_one_on_mlp_post_equals_the_same_edit_in_transformers(built, name: str) -> None:
    """k=1 on mlp_post (gpt-oss: expert_post) equals transformers with the down projection's
    input edited the same way (a pre-hook on down_proj / c_proj; gpt-oss: `_apply_gate`)."""
    b = built(name)
    component = b.neuron_sites[1]
    edit = {"layer_name": LAYER, "component": component, "op": "topk", "k": 1}
    ref = reference_forward(b, b.ids, topk_post=(LAYER, 1))
    ours = np.array(mlx_engine.run_with_cache(b.kit, b.ids, interventions=[edit]).logits)
    np.testing.assert_allclose(ours, ref["logits"], atol=ATOL, rtol=RTOL, err_msg=name)
    # The edit is not vacuous: the unedited logits are far from the edited ones.
    plain = np.array(mlx_engine.run_with_cache(b.kit, b.ids).logits)
    assert np.abs(plain - ours).max() > 100 * ATOL
    # During generation the edit applies at every pass (prompt and each decode step).
    tokens = [r.token for r in mlx_engine.create_generator(b.kit, b.ids, interventions=[edit], max_tokens=DECODE_STEPS)]
    ref = reference_forward(b, b.ids + tokens[:-1], topk_post=(LAYER, 1))
    assert tokens == ref["logits"][len(b.ids) - 1 :].argmax(-1).tolist()


# --------------------------------------------------------------------------- 3. subsets


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_subset_capture_is_those_columns_in_that_order(built, name: str) -> None:
    b = built(name)
    hooks = []
    for component in b.sites:
        hooks.append({"layer_name": LAYER, "component": component})
        hooks.append({"layer_name": LAYER, "component": component, "indices": SUBSET, "hook_id": f"{component}.subset"})
    steps = list(mlx_engine.create_generator_with_activations(b.kit, b.ids, hooks, max_tokens=3))
    assert len(steps) == 3
    for _, activations in steps:
        for component in b.sites:
            (full,) = activations[f"layers.{LAYER}.{component}"]
            (sub,) = activations[f"{component}.subset"]
            assert sub.indices == SUBSET and full.indices is None
            assert sub.metadata()["indices"] == SUBSET
            assert sub.positions == full.positions
            assert sub.shape == full.shape[:-1] + [len(SUBSET)]
            np.testing.assert_array_equal(np.array(sub.array), np.array(full.array)[..., SUBSET])
            if component.startswith("expert"):
                np.testing.assert_array_equal(np.array(sub.extras["experts"]), np.array(full.extras["experts"]))
    # The first subset request of the brief, spelled exactly.
    if not b.moe:
        out = mlx_engine.run_with_cache(b.kit, b.ids, [{"layer_name": 1, "component": "mlp_post", "indices": [3, 0, 7]}])
        assert out.activations["layers.1.mlp_post"].indices == [3, 0, 7]
    # An index past the last feature is refused, naming the width.
    with pytest.raises(mlx_engine.HookSpecError, match=str(b.d_mlp)):
        b.kit.resolve_hooks([{"layer_name": LAYER, "component": b.neuron_sites[1], "indices": [0, b.d_mlp]}])


# --------------------------------------------------------------------------- 4. aliases


def _alias_pairs(b: Built) -> list[tuple[str, dict[str, Any]]]:
    """(TransformerLens name, the canonical spec it must mean)."""
    L = LAYER
    pairs = [
        (f"blocks.{L}.hook_resid_mid", {"layer_name": f"layers.{L}", "component": "resid_mid"}),
        (f"blocks.{L}.hook_in", {"layer_name": f"layers.{L}", "component": "residual", "capture_input": True, "capture_output": False}),
        (f"blocks.{L}.hook_resid_pre", {"layer_name": f"layers.{L}", "component": "residual", "capture_input": True, "capture_output": False}),
        (f"blocks.{L}.hook_out", {"layer_name": f"layers.{L}", "component": "residual"}),
        (f"blocks.{L}.attn.q.hook_out", {"layer_name": f"layers.{L}", "component": "query"}),
        (f"blocks.{L}.attn.k.hook_out", {"layer_name": f"layers.{L}", "component": "key"}),
        (f"blocks.{L}.attn.v.hook_out", {"layer_name": f"layers.{L}", "component": "value"}),
    ]
    if not b.moe:
        pairs += [
            (f"blocks.{L}.mlp.hook_pre", {"layer_name": f"layers.{L}", "component": "mlp_pre"}),
            (f"blocks.{L}.mlp.hook_post", {"layer_name": f"layers.{L}", "component": "mlp_post"}),
        ]
    return pairs


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_transformerlens_names_resolve_to_the_canonical_hook(built, name: str) -> None:
    b = built(name)
    pairs = _alias_pairs(b)
    hooks: list[Any] = []
    for n, (tl, canonical) in enumerate(pairs):
        (a,) = b.kit.resolve_hooks([tl])
        (c,) = b.kit.resolve_hooks([canonical])
        assert (a.site, a.layer, a.layer_name, a.component, a.is_input) == (c.site, c.layer, c.layer_name, c.component, c.is_input), tl
        assert a.hook_id == c.hook_id, tl  # the canonical id, whichever name asked
        hooks += [{"layer_name": tl, "hook_id": f"tl{n}"}, {**canonical, "hook_id": f"canonical{n}"}]
    # The canonical ids themselves, used as names, resolve to the same sites.
    for component in b.sites:
        (a,) = b.kit.resolve_hooks([f"layers.{LAYER}.{component}"])
        assert a.site == f"layers.{LAYER}.{component}" and a.component.value == component
    out = mlx_engine.run_with_cache(b.kit, b.ids, hooks)
    for n, (tl, _) in enumerate(pairs):
        np.testing.assert_array_equal(np.array(out[f"tl{n}"]), np.array(out[f"canonical{n}"]), err_msg=tl)
    if b.moe:
        # A mixture of experts has no dense neurons to name.
        for tl in (f"blocks.{LAYER}.mlp.hook_pre", f"blocks.{LAYER}.mlp.hook_post"):
            with pytest.raises(mlx_engine.HookSpecError, match="expert_post"):
                b.kit.resolve_hooks([tl])


# --------------------------------------------------------------------------- 5. budget


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_capture_budget_refuses_an_oversize_neuron_capture_before_generating(built, name: str) -> None:
    b = built(name)
    component = b.neuron_sites[1]
    hook = f"layers.0.{component}"
    max_tokens = 5
    rows = len(b.ids) + max_tokens - 1
    itemsize = b.kit.activation_itemsize
    ids_per_row = b.k if b.moe else 0  # an expert capture carries its expert ids too
    per_row = (b.k or 1) * b.d_mlp + ids_per_row
    full = mlx_engine.estimate_capture_bytes(b.kit, [hook], len(b.ids), max_tokens)
    assert full == rows * per_row * itemsize
    two = {"layer_name": 0, "component": component, "indices": [5, 2]}
    small = mlx_engine.estimate_capture_bytes(b.kit, [two], len(b.ids), max_tokens)
    assert small == rows * ((b.k or 1) * 2 + ids_per_row) * itemsize
    if not b.moe:
        assert small * b.d_mlp == full * 2  # exactly in proportion

    budget = (small + full) // 2
    with pytest.raises(mlx_engine.CaptureBudgetError) as info:
        # Raised at the call: nothing is asked of the generator.
        mlx_engine.create_generator_with_activations(b.kit, b.ids, [hook], max_tokens=max_tokens, capture_budget_bytes=budget)
    assert info.value.estimate_bytes == full and info.value.budget_bytes == budget

    # The two-neuron request fits the same budget, and captures what was estimated.
    steps = list(mlx_engine.create_generator_with_activations(b.kit, b.ids, [two], max_tokens=max_tokens, capture_budget_bytes=budget))
    captured = sum(
        np.array(c.array).nbytes + sum(np.array(e).nbytes for e in c.extras.values())
        for _, acts in steps
        for caps in acts.values()
        for c in caps
    )
    assert len(steps) == max_tokens
    assert captured == small
