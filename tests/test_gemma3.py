"""Native Gemma 3 text (`gemma3_text`) against transformers' Gemma3ForCausalLM (float32, eager).

Two tiny checkpoints written by transformers (hidden 64, 4 query heads over 2 KV heads,
sliding window 8, weights spread 0.15):
- "linear": 4 layers sliding, sliding, full, sliding (sliding_window_pattern 3), tied head,
  per-kind RoPE in transformers 5's layout: local theta 2e4, global theta 5e5 with linear
  scaling (factor 4), query_pre_attn_scalar 16 (= head_dim).
- "all-sliding": 4 layers and a config.json with neither layer_types nor
  sliding_window_pattern, so every layer is local (mlx-lm 0.32 raises IndexError on such a config);
  default thetas, head_dim 32 != hidden / heads, query_pre_attn_scalar 256, biased attention,
  an untied head, final logit soft-capping 30 and an `attn_logit_softcapping` (2) that
  transformers' Gemma 3 reads but never applies.
Every prompt is longer than the window. Logits are of order 10; tolerances are absolute
unless an rtol is given.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import tiny_checkpoints as tc
import torch
from safetensors.numpy import load_file, save_file
from transformers import (
    AttentionInterface,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.gemma3 import modeling_gemma3

import mlx_engine
from mlx_engine.models.gemma3 import ModelArgs
from mlx_engine.models.rope import normalize_rope_config
from mlx_engine.tools.convert import quantize_checkpoint

ATOL = RTOL = 1e-4  # every captured component vs transformers, float32 on both sides
LOGIT_TOL = 1e-4  # logits vs transformers / mlx-lm
PATHS_TOL = 5e-5  # our explicit vs our fused attention: float32 reassociation on logits of order 10
SUM_TOL = 1e-4  # attention + mlp vs residual - resid_pre (float32 rounding of O(10) sums)
DEQUANT_TOL = 1e-4  # 4-bit model vs transformers carrying the same weights dequantized
WINDOW = 8
PROMPT_LEN = 20
PREFILL = 12
DECODE_STEPS = 4  # component captures: the prompt plus 3 decode steps
PAST_WRAP = WINDOW + 20  # greedy steps compared with a reference forward
GREEDY = 32

SLIDING, FULL = "sliding_attention", "full_attention"
LINEAR_ROPE = {
    FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
    SLIDING: {"rope_type": "default", "rope_theta": 20000.0},
}
CHECKPOINTS: dict[str, dict[str, Any]] = {
    "linear": dict(sliding_window_pattern=3, head_dim=16, query_pre_attn_scalar=16, rope_parameters=LINEAR_ROPE),
    "all-sliding": dict(
        head_dim=32,
        attention_bias=True,
        tie_word_embeddings=False,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=2.0,  # would move scores of order 1 by far more than ATOL if applied
    ),
}
LAYER_TYPES = {"linear": [SLIDING, SLIDING, FULL, SLIDING], "all-sliding": [SLIDING] * 4}


def build_gemma3(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    tokenizer = tc.build_tokenizer(out_dir)
    config = Gemma3TextConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "sliding_window": WINDOW,
            "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )
    config._attn_implementation = "eager"
    model = Gemma3ForCausalLM(config)
    tc.spread_weights(model, seed=seed)
    model.eval()
    return tc._save(model, tokenizer, out_dir)


def edit_config(path: Path, drop: tuple[str, ...] = (), **changes: Any) -> None:
    config = tc.read_config(path)
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config, indent=2))


@dataclass
class Case:
    name: str
    path: Path
    kit: Any
    ref: Gemma3ForCausalLM

    @property
    def model(self) -> nn.Module:
        return self.kit.model


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gemma3")


@pytest.fixture(scope="module")
def cases(root: Path) -> dict[str, Case]:
    built = {}
    for name, overrides in CHECKPOINTS.items():
        path = build_gemma3(root / name, **overrides)
        if name == "all-sliding":
            # What a config with no pattern looks like: the kinds are derived from the default of 6.
            edit_config(path, drop=("layer_types", "sliding_window_pattern", "_sliding_window_pattern"))
        ref = tc.load_reference(path, "Gemma3ForCausalLM")
        assert ref.config.layer_types == LAYER_TYPES[name]
        built[name] = Case(name, path, mlx_engine.load_model(path), ref)
    return built


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def case(request: pytest.FixtureRequest, cases: dict[str, Case]) -> Case:
    return cases[request.param]


@pytest.fixture(scope="module")
def linear_case(cases: dict[str, Case]) -> Case:
    return cases["linear"]


@pytest.fixture(scope="module")
def v4_path(linear_case: Case, root: Path) -> Path:
    """The "linear" checkpoint with the config keys transformers 4 wrote for the same model."""
    path = root / "linear-v4"
    shutil.copytree(linear_case.path, path)
    edit_config(
        path,
        drop=("layer_types", "rope_parameters", "_sliding_window_pattern", "tie_word_embeddings"),
        rope_theta=500000.0,
        rope_local_base_freq=20000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        sliding_window_pattern=3,
        transformers_version="4.50.0",
    )
    return path


@lru_cache(maxsize=None)
def _text_tokens(path: Path) -> tuple[int, ...]:
    return tuple(PreTrainedTokenizerFast.from_pretrained(path)(tc.training_text())["input_ids"])


def text_ids(path: Path, n: int) -> list[int]:
    return list(_text_tokens(path)[:n])


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def our_logits(model: nn.Module, ids: list[int], cache: Any = None) -> np.ndarray:
    return np.array(model(mx.array(ids)[None], cache=cache)[0].astype(mx.float32))


def their_logits(ref: Any, ids: list[int], **kwargs: Any) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor([ids]), **kwargs).logits[0].numpy()


def decode_logits(model: nn.Module, ids: list[int], prefill: int) -> np.ndarray:
    """Logits for positions prefill-1 .. len-1: one prefill pass, then one token a step."""
    cache = model.make_cache()
    rows = [our_logits(model, ids[:prefill], cache)[-1]]
    for t in range(prefill, len(ids)):
        rows.append(our_logits(model, ids[t : t + 1], cache)[0])
    return np.stack(rows)


def chunked_logits(model: nn.Module, ids: list[int], chunk: int) -> np.ndarray:
    cache = model.make_cache()
    return np.concatenate([our_logits(model, ids[i : i + chunk], cache) for i in range(0, len(ids), chunk)])


def greedy(model: nn.Module, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens from a prompt through the caches, and the logits that chose each."""
    cache = model.make_cache()
    logits = our_logits(model, prompt, cache)[-1]
    tokens, rows = [], []
    for _ in range(n):
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = our_logits(model, [tokens[-1]], cache)[0]
    return tokens, np.stack(rows)


# --- the model the config describes ------------------------------------------------------


def test_layer_kinds_caches_and_rope_per_layer(case: Case) -> None:
    model = case.model
    assert model.args.layer_types == LAYER_TYPES[case.name]
    caches = model.make_cache()
    assert [type(c).__name__ for c in caches] == ["RotatingKVCache" if t == SLIDING else "KVCache" for t in LAYER_TYPES[case.name]]
    assert all(c.max_size == WINDOW for c in caches if type(c).__name__ == "RotatingKVCache")
    expected = {  # layer kind -> (base, position scale) of nn.RoPE
        "linear": {SLIDING: (20000.0, 1.0), FULL: (500000.0, 0.25)},
        "all-sliding": {SLIDING: (10000.0, 1.0)},
    }[case.name]
    for layer in model.layers:
        rope = layer.self_attn.rope
        assert isinstance(rope, nn.RoPE)
        assert (rope.base, rope.scale) == expected[layer.layer_type]
        assert layer.self_attn.window == (WINDOW if layer.layer_type == SLIDING else None)
    info = case.kit.arch_info
    assert info.post_norms and info.d_mlp == 128 and info.sliding_window == WINDOW
    points = model.hook_points()
    assert {"layers.3.attention_pre_norm", "layers.3.mlp_pre_norm", "layers.3.mlp_post"} <= set(points)
    assert "layers.0.router" not in points
    assert ("lm_head" in model) == (case.name == "all-sliding")


CONFIG_LAYOUTS: list[dict[str, Any]] = [
    {"num_hidden_layers": 4},
    {"num_hidden_layers": 7},
    {"num_hidden_layers": 7, "sliding_window_pattern": 2},
    {"num_hidden_layers": 3, "sliding_window_pattern": 2, "layer_types": [FULL, SLIDING, FULL]},
    {"num_hidden_layers": 6, "rope_theta": 5e5, "rope_local_base_freq": 2e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    {"num_hidden_layers": 6, "rope_parameters": {FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5}, SLIDING: {"rope_type": "default", "rope_theta": 2e4}}},
    # Old scaling naming only `type`: transformers keeps the global layers' default rope_type.
    {"num_hidden_layers": 6, "rope_scaling": {"type": "linear", "factor": 8.0}},
    {"num_hidden_layers": 6, "rope_parameters": {FULL: {"type": "linear", "factor": 2.0, "rope_theta": 1e5}, SLIDING: {"rope_theta": 3e4}}},
    # A flat dict (Llama's shape), which Gemma 3 ignores, whether or not per-kind dicts sit beside it.
    {"num_hidden_layers": 6, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}},
    {"num_hidden_layers": 6, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5, FULL: {"rope_type": "default", "rope_theta": 1e5}}},
]


@pytest.mark.parametrize("layout", CONFIG_LAYOUTS, ids=lambda d: ",".join(sorted(d)) + f"-{d['num_hidden_layers']}")
def test_layer_kinds_and_rope_resolve_as_transformers_does(layout: dict[str, Any]) -> None:
    """Layer kinds and each kind's RoPE, from either layout, exactly as Gemma3TextConfig resolves them
    (ours after the loader's normalize_rope_config, as load_model reads a config)."""
    theirs = Gemma3TextConfig(**json.loads(json.dumps(layout)))
    ours = ModelArgs.from_dict(normalize_rope_config({"model_type": "gemma3_text", **json.loads(json.dumps(layout))}))
    assert ours.layer_types == theirs.layer_types
    for kind in (SLIDING, FULL):
        expected = theirs.rope_parameters[kind]
        base, scaling = ours.rope_of(kind)
        assert base == expected["rope_theta"]
        if expected["rope_type"] == "default":
            assert scaling is None
        else:
            assert scaling["rope_type"] == expected["rope_type"] and scaling["factor"] == expected["factor"]


# --- every component, prompt and decode ---------------------------------------------------


class Reference:
    """One transformers forward with every intermediate tensor of every Gemma 3 block recorded."""

    def __init__(self, model: Gemma3ForCausalLM) -> None:
        self.model = model
        self.t: dict[str, np.ndarray] = {}

    def run(self, ids: list[int]) -> None:
        store, handles = self.t, []

        def save(key: str, fn: Callable[[Any, Any], torch.Tensor] = lambda a, o: o[0] if isinstance(o, tuple) else o):
            def hook(module: Any, args: Any, output: Any) -> None:
                store[key] = fn(args, output).detach()[0].float().numpy()

            return hook

        def on(module: Any, key: str, fn: Any = None) -> None:
            handles.append(module.register_forward_hook(save(key, fn) if fn else save(key)))

        inner = self.model.model
        on(inner.embed_tokens, "embedding")
        on(inner.norm, "final_norm")
        for i, block in enumerate(inner.layers):
            on(block, f"{i}.residual")
            on(block, f"{i}.resid_pre", lambda a, o: a[0])
            on(block.input_layernorm, f"{i}.layernorm")
            on(block.self_attn, f"{i}.attention_pre_norm")
            on(block.post_attention_layernorm, f"{i}.attention")
            on(block.pre_feedforward_layernorm, f"{i}.resid_mid", lambda a, o: a[0])
            on(block.pre_feedforward_layernorm, f"{i}.mlp_in")
            on(block.mlp.gate_proj, f"{i}.mlp_pre")
            on(block.mlp.down_proj, f"{i}.mlp_post", lambda a, o: a[0])
            on(block.mlp, f"{i}.mlp_pre_norm")
            on(block.post_feedforward_layernorm, f"{i}.mlp")

        def recording_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any):
            i = module.layer_idx
            store[f"{i}.query"], store[f"{i}.key"], store[f"{i}.value"] = (t[0].numpy() for t in (query, key, value))
            k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            scores = torch.matmul(query, k.transpose(2, 3)) * kwargs["scaling"]
            assert kwargs.get("softcap") is None  # Gemma 3 never soft-caps attention
            store[f"{i}.attention_scores"] = scores[0].numpy()
            store[f"{i}.allowed"] = (attention_mask[:, :, :, : k.shape[-2]] == 0)[0].expand_as(scores[0]).numpy()
            out, weights = modeling_gemma3.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
            store[f"{i}.attention_pattern"] = weights[0].numpy()
            store[f"{i}.z"] = out[0].transpose(0, 1).numpy()
            return out, weights

        AttentionInterface.register("gemma3_recording", recording_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register("gemma3_recording", eager_mask)
        self.model.config._attn_implementation = "gemma3_recording"
        try:
            with torch.no_grad():
                store["logits"] = self.model(torch.tensor([ids])).logits[0].numpy()
        finally:
            self.model.config._attn_implementation = "eager"
            for h in handles:
                h.remove()


# (component, capture_input) -> reference tensor
REF_KEY = {
    ("residual", True): "resid_pre",
    ("attention", True): "layernorm",
    ("mlp", True): "mlp_in",
    ("layernorm", True): "resid_pre",
}


def all_hooks(kit: Any) -> list[dict[str, Any]]:
    listing = mlx_engine.ActivationHookManager(kit).hook_points()
    hooks: list[dict[str, Any]] = [{"layer_name": "embedding", "component": "embedding"}, {"layer_name": "final_norm", "component": "layernorm"}]
    for layer in listing["layers"]:
        for component, desc in layer["components"].items():
            hooks.append({"layer_name": layer["name"], "component": component})
            if desc["supports_input"]:
                hooks.append({"layer_name": layer["name"], "component": component, "capture_input": True, "capture_output": False})
    return hooks


def compare(capture: Any, ref: dict[str, np.ndarray], layer_types: list[str]) -> None:
    ours = np.array(capture.array, dtype=np.float32)
    start, end = capture.positions
    what = f"{capture.hook_id} step {capture.step} rows {start}:{end}"
    comp, i = capture.component, capture.layer
    if i is None:
        np.testing.assert_allclose(ours, ref[capture.layer_name][start:end], atol=ATOL, rtol=RTOL, err_msg=what)
        return
    if comp in ("attention_scores", "attention_pattern"):
        keys = np.array(capture.key_positions)
        if layer_types[i] == SLIDING and capture.step > 0:
            assert keys.tolist() == list(range(start - WINDOW + 1, start + 1)), what
        full = ref[f"{i}.{comp}"][:, start:end]
        expected = full[:, :, keys]
        if comp == "attention_scores":
            ok = ref[f"{i}.allowed"][:, start:end][:, :, keys]
            assert np.all(np.isneginf(ours[~ok])), what
            np.testing.assert_allclose(ours[ok], expected[ok], atol=ATOL, rtol=RTOL, err_msg=what)
        else:
            np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)
            rest = np.setdiff1d(np.arange(full.shape[-1]), keys)
            assert np.abs(full[:, :, rest]).max(initial=0.0) < 1e-6, what  # no mass outside the reported keys
        return
    expected = ref[f"{i}.{REF_KEY.get((comp, capture.is_input), comp)}"]
    expected = expected[:, start:end] if comp in ("query", "key", "value", "z") else expected[start:end]
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL, err_msg=what)


def test_every_component_every_layer_matches_transformers(case: Case) -> None:
    ids = text_ids(case.path, PROMPT_LEN)
    hooks = all_hooks(case.kit)
    components = {h["component"] for h in hooks}
    assert {"attention_pre_norm", "mlp_pre_norm", "mlp_pre", "mlp_post", "z", "resid_mid"} <= components
    steps = list(mlx_engine.create_generator_with_activations(case.kit, ids, hooks, max_tokens=DECODE_STEPS))
    assert len(steps) == DECODE_STEPS
    generated = [r.token for r, _ in steps]
    ref = Reference(case.ref)
    ref.run(ids + generated[:-1])
    hook_ids = {r.hook_id for r in case.kit.resolve_hooks(hooks)}
    n_captures = 0
    for result, activations in steps:
        assert set(activations) == hook_ids
        for captures in activations.values():
            for capture in captures:
                assert capture.step == result.step
                compare(capture, ref.t, LAYER_TYPES[case.name])
                n_captures += 1
    assert n_captures == len(hook_ids) * DECODE_STEPS
    assert generated == ref.t["logits"][len(ids) - 1 :].argmax(-1).tolist()


def test_sandwich_sublayers_sum_to_the_block_update(case: Case) -> None:
    """What `attention` and `mlp` capture is exactly what each block adds to the residual stream."""
    ids = text_ids(case.path, PROMPT_LEN)
    hooks = [{"layer_name": i, "component": c} for i in range(4) for c in ("attention", "mlp", "residual")]
    hooks += [{"layer_name": i, "component": "residual", "capture_input": True, "capture_output": False} for i in range(4)]
    cache = mlx_engine.run_with_cache(case.kit, ids, hooks, prefill_step_size=7)
    got = {(c.layer, c.component, c.is_input): np.array(c.array) for c in cache.activations.values()}
    for i in range(4):
        update = got[(i, "residual", False)] - got[(i, "residual", True)]
        assert max_diff(got[(i, "attention", False)] + got[(i, "mlp", False)], update) <= SUM_TOL


# --- logits ----------------------------------------------------------------------------


def test_logits_past_the_rotating_cache_wrap_match_transformers(case: Case) -> None:
    """A prompt longer than the window, then window + 20 greedy steps: each step's logits
    against one reference forward over the whole sequence; the first 32 tokens against
    transformers' own greedy generation."""
    prompt = text_ids(case.path, PREFILL)
    tokens, ours = greedy(case.model, prompt, GREEDY)
    theirs = their_logits(case.ref, prompt + tokens[:-1])[PREFILL - 1 :]
    per_step = np.abs(ours - theirs).max(axis=-1)
    assert len(per_step) >= PAST_WRAP and per_step.max() <= LOGIT_TOL, per_step
    with torch.no_grad():
        out = case.ref.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=GREEDY, min_new_tokens=GREEDY, eos_token_id=None, pad_token_id=0
        )
    assert out[0, PREFILL:].tolist() == tokens


def test_prompt_logits_match_transformers(case: Case) -> None:
    """One pass without a cache, one through the caches, and 7-token chunks (a rotating cache
    trims and re-appends mid-prompt)."""
    ids = text_ids(case.path, 64)
    theirs = their_logits(case.ref, ids)
    assert max_diff(our_logits(case.model, ids), theirs) <= LOGIT_TOL
    assert max_diff(our_logits(case.model, ids, case.model.make_cache()), theirs) <= LOGIT_TOL
    assert max_diff(chunked_logits(case.model, ids, 7), theirs) <= LOGIT_TOL
    last = np.array(case.model(mx.array(ids)[None], last_only=True)[0])
    assert last.shape[0] == 1 and max_diff(last, theirs[-1:]) <= LOGIT_TOL


def test_input_embeddings_enter_block_zero_as_given(case: Case) -> None:
    ids = text_ids(case.path, PROMPT_LEN)
    with torch.no_grad():
        embeds = case.ref.model.embed_tokens(torch.tensor([ids]))  # already scaled by sqrt(hidden)
        theirs = case.ref(inputs_embeds=embeds).logits[0].numpy()
    ours = np.array(case.model(None, input_embeddings=mx.array(embeds.numpy()))[0])
    assert max_diff(ours, theirs) <= LOGIT_TOL


def test_explicit_attention_matches_fused(case: Case) -> None:
    ids = text_ids(case.path, PREFILL + PAST_WRAP)
    fused = (decode_logits(case.model, ids, PREFILL), chunked_logits(case.model, ids, 7))
    points = [hp for name, hp in case.model.hook_points().items() if name.endswith("attention_pattern")]
    for hp in points:
        hp.fn = lambda point, x, ctx: x
    try:
        explicit = (decode_logits(case.model, ids, PREFILL), chunked_logits(case.model, ids, 7))
    finally:
        for hp in points:
            hp.fn = None
    assert max_diff(explicit[0], fused[0]) <= PATHS_TOL and max_diff(explicit[1], fused[1]) <= PATHS_TOL


# --- layouts ---------------------------------------------------------------------------


def test_transformers4_layout_gives_the_same_model(linear_case: Case, v4_path: Path) -> None:
    """rope_theta + rope_local_base_freq + rope_scaling + sliding_window_pattern, no layer_types
    and no tie_word_embeddings: transformers reads it as the same model, and so do we."""
    v4_ref = tc.load_reference(v4_path, "Gemma3ForCausalLM")
    assert v4_ref.config.layer_types == linear_case.ref.config.layer_types
    assert v4_ref.config.rope_parameters == linear_case.ref.config.rope_parameters
    ids = text_ids(v4_path, PREFILL + PAST_WRAP)
    theirs = their_logits(linear_case.ref, ids)
    assert max_diff(their_logits(v4_ref, ids), theirs) == 0.0
    v4 = mlx_engine.load_model(v4_path).model
    assert v4.args.rope_parameters == linear_case.model.args.rope_parameters
    assert max_diff(our_logits(v4, ids), theirs) <= LOGIT_TOL
    assert max_diff(decode_logits(v4, ids, PREFILL), theirs[PREFILL - 1 :]) <= LOGIT_TOL


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_key_layouts_load_the_same_text_model(linear_case: Case, root: Path, prefix: str) -> None:
    """The language model's keys as transformers 4 (and mlx-lm's wrapper) or transformers 5 nest
    them in a multimodal Gemma 3 checkpoint, with a stored rotary buffer to drop."""
    path = root / f"prefixed-{prefix.replace('.', '_')}"
    shutil.copytree(linear_case.path, path)
    weights = load_file(path / "model.safetensors")
    renamed = {prefix + k[len("model."):]: v for k, v in weights.items()}
    head_dim = linear_case.model.args.head_dim
    renamed[f"{prefix}rotary_emb.inv_freq"] = (1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    ids = text_ids(path, PROMPT_LEN)
    ours = our_logits(mlx_engine.load_model(path).model, ids)
    assert max_diff(ours, their_logits(linear_case.ref, ids)) <= LOGIT_TOL


def test_logits_match_mlx_lm_on_the_transformers4_layout(linear_case: Case, v4_path: Path) -> None:
    """mlx-lm's gemma3_text reads the old keys (and only the pattern), so it is a second reference here."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, _ = mlx_lm_load_model(v4_path)
    assert type(theirs).__module__ == "mlx_lm.models.gemma3_text"
    ids = text_ids(v4_path, PREFILL + PAST_WRAP)
    ours = linear_case.model
    assert max_diff(our_logits(ours, ids), our_logits(theirs, ids)) <= LOGIT_TOL
    assert max_diff(decode_logits(ours, ids, PREFILL), decode_logits(theirs, ids, PREFILL)) <= LOGIT_TOL


def test_mlx_lm_4bit_conversion_loads_as_mlx_lm_computes_it(v4_path: Path, root: Path) -> None:
    """A folder written by mlx-lm's own quantize/save (its key names, no lm_head for a tied model)."""
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    theirs, config = mlx_lm_load_model(v4_path)
    theirs, config = quantize_model(theirs, config, group_size=32, bits=4)
    folder = root / "mlx-lm-q4"
    save_model(folder, theirs)
    save_config(config, folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(v4_path / name, folder / name)
    assert not any(k.startswith("lm_head.") for k in load_file(folder / "model.safetensors"))
    ours = mlx_engine.load_model(folder).model
    assert isinstance(ours.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ids = text_ids(v4_path, PREFILL + PAST_WRAP)
    assert max_diff(our_logits(ours, ids), our_logits(theirs, ids)) <= LOGIT_TOL
    assert max_diff(decode_logits(ours, ids, PREFILL), decode_logits(theirs, ids, PREFILL)) <= LOGIT_TOL


# --- 4-bit -------------------------------------------------------------------------------


def dequantized_reference(kit: Any, float_path: Path) -> Gemma3ForCausalLM:
    """transformers' Gemma 3 carrying exactly the weights our quantized model computes with."""
    reference = tc.load_reference(float_path, "Gemma3ForCausalLM")
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    replaced = set()
    for path, module in kit.model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits)
            state[f"{path}.weight"] = torch.from_numpy(np.array(w.astype(mx.float32)))
            replaced.add(f"{path}.weight")
    if kit.model.args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    assert {"model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"} <= replaced
    reference.load_state_dict(state, strict=True)
    return reference


def test_4bit_conversion_matches_dequantized_transformers(linear_case: Case, v4_path: Path, root: Path) -> None:
    quantized_path = quantize_checkpoint(v4_path, root / "q4", bits=4, group_size=32)
    kit = mlx_engine.load_model(quantized_path)
    assert kit.config["quantization"]["bits"] == 4 and kit.config["quantization"]["group_size"] == 32
    assert isinstance(kit.model.model.embed_tokens, nn.QuantizedEmbedding)
    assert kit.model.args.rope_parameters == linear_case.model.args.rope_parameters
    reference = dequantized_reference(kit, linear_case.path)
    ids = text_ids(quantized_path, PREFILL + PAST_WRAP)
    theirs = their_logits(reference, ids)
    prompt = max_diff(our_logits(kit.model, ids), theirs)
    decode = max_diff(decode_logits(kit.model, ids, PREFILL), theirs[PREFILL - 1 :])
    float_gap = max_diff(our_logits(kit.model, ids), their_logits(linear_case.ref, ids))
    assert float_gap > 1e-2  # it is a different model from the float checkpoint
    assert prompt <= DEQUANT_TOL and decode <= DEQUANT_TOL, (prompt, decode)


def test_4bit_conversion_of_the_transformers5_layout_keeps_the_rope(linear_case: Case, root: Path) -> None:
    quantized = mlx_engine.load_model(quantize_checkpoint(linear_case.path, root / "q4-v5", bits=4, group_size=32))
    assert quantized.model.args.rope_parameters == linear_case.model.args.rope_parameters
