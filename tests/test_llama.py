"""Native Llama / Qwen2 / Mistral against transformers (float32, eager) and mlx-lm.

Tiny random checkpoints written by transformers: 3 layers, 4 query heads over 2 KV heads,
head_dim 16; Qwen2 adds q/k/v biases, Mistral a sliding window of 8 on every layer (so
its rotating cache wraps during decode). Logits are of order 1 to 6; every tolerance
below is absolute.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from tiny_checkpoints import build_llama, load_reference, training_text

from mlx_engine.tools.convert import quantize_checkpoint
from mlx_engine.loading import ModelKit, load_model
from mlx_engine.models.llama import ModelArgs
from mlx_engine.models.rope import normalize_rope_config

LOGIT_TOL = 1e-4  # ours vs transformers, and ours vs mlx-lm on the same weights
PATHS_TOL = 1e-5  # our explicit attention vs our fused attention
PATTERN_TOL = 1e-5  # our attention probabilities vs transformers' output_attentions
HIDDEN_TOL = 1e-4  # captured residual stream vs transformers' hidden_states
DEQUANT_TOL = 1e-4  # quantized matmuls vs the same weights dequantized to float32
WINDOW = 8
SHORT, LONG = 20, 256
PREFILL, DECODE_STEPS = 12, 24

REFERENCE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# Configurations beyond the three defaults: tied embeddings, every bias, a head_dim that is
# not hidden_size / heads, and the scaled RoPE types.
EXTRA_CONFIGS = {
    "llama-tied-bias-llama3rope": (
        "llama",
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            head_dim=32,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    # Qwen2's optional windows: full attention below max_window_layers, sliding above, so
    # one forward mixes a KVCache and RotatingKVCaches.
    "qwen2-sliding-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen2-yarn": (
        "qwen2",
        dict(
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
}


@dataclass
class Case:
    name: str
    path: Path
    kit: ModelKit
    ref: torch.nn.Module

    @property
    def model(self) -> nn.Module:
        return self.kit.model


@lru_cache(maxsize=None)
def _text_tokens(path: Path) -> tuple[int, ...]:
    from transformers import PreTrainedTokenizerFast

    return tuple(PreTrainedTokenizerFast.from_pretrained(path)(training_text())["input_ids"])


def text_ids(path: Path, n: int) -> np.ndarray:
    """The first `n` tokens of a fixed English-and-code text, by the checkpoint's tokenizer."""
    ids = _text_tokens(path)
    assert len(ids) >= n
    return np.array(ids[:n])


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def our_logits(model: nn.Module, ids: np.ndarray, cache: Any = None) -> np.ndarray:
    return np.array(model(mx.array(ids)[None], cache=cache)[0].astype(mx.float32))


def their_forward(ref: torch.nn.Module, ids: np.ndarray, **kwargs: Any) -> Any:
    with torch.no_grad():
        return ref(torch.tensor(ids)[None], **kwargs)


def decode_logits(model: nn.Module, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits for positions prefill-1 .. len-1: one prefill pass, then one token a step."""
    cache = make_prompt_cache(model)
    rows = [our_logits(model, ids[:prefill], cache)[-1]]
    for t in range(prefill, len(ids)):
        rows.append(our_logits(model, ids[t : t + 1], cache)[0])
    return np.stack(rows)


def chunked_logits(model: nn.Module, ids: np.ndarray, chunk: int) -> np.ndarray:
    """Logits for every position, the prompt fed through the cache `chunk` tokens at a time."""
    cache = make_prompt_cache(model)
    return np.concatenate([our_logits(model, ids[i : i + chunk], cache) for i in range(0, len(ids), chunk)])


@contextmanager
def armed(points: dict[str, Any], fn: Callable) -> Iterator[None]:
    for hp in points.values():
        hp.fn = fn
    try:
        yield
    finally:
        for hp in points.values():
            hp.fn = None


def build_case(name: str, variant: str, overrides: dict, root: Path) -> Case:
    path, _ = build_llama(root / name, variant=variant, **overrides)
    return Case(name, path, load_model(path), load_reference(path, REFERENCE_CLASSES[variant]))


@pytest.fixture(scope="module", params=list(REFERENCE_CLASSES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return build_case(request.param, request.param, {}, tmp_path_factory.mktemp("llama_family"))


@pytest.fixture(scope="module", params=list(EXTRA_CONFIGS))
def extra_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    variant, overrides = EXTRA_CONFIGS[request.param]
    return build_case(request.param, variant, overrides, tmp_path_factory.mktemp("llama_extra"))


def test_config_selects_architecture(case: Case) -> None:
    args = case.model.args
    attn = case.model.layers[0].self_attn
    assert ("bias" in attn.q_proj) == (case.name == "qwen2")
    assert "bias" not in attn.o_proj
    expected = "sliding_attention" if case.name == "mistral" else "full_attention"
    assert args.layer_types == [expected] * 3
    assert case.kit.arch_info.sliding_window == (WINDOW if case.name == "mistral" else None)
    caches = case.model.make_cache()
    assert [type(c).__name__ for c in caches] == ["RotatingKVCache" if case.name == "mistral" else "KVCache"] * 3
    points = case.model.hook_points()
    assert "embedding" in points and "final_norm" in points and "layers.2.attention_pattern" in points
    assert "layers.0.router" not in points


@pytest.mark.parametrize("n", [SHORT, LONG])
def test_prompt_logits_match_transformers(case: Case, n: int) -> None:
    ids = text_ids(case.path, n)
    theirs = their_forward(case.ref, ids).logits[0].numpy()
    no_cache = max_diff(our_logits(case.model, ids), theirs)
    with_cache = max_diff(our_logits(case.model, ids, case.model.make_cache()), theirs)
    # Chunks of 7 make a rotating cache trim and re-append mid-prompt.
    chunked = max_diff(chunked_logits(case.model, ids, 7), theirs)
    print(f"{case.name} prompt {n}: max |diff| {no_cache:.2e} no cache, {with_cache:.2e} cache, {chunked:.2e} chunked")
    assert no_cache <= LOGIT_TOL and with_cache <= LOGIT_TOL and chunked <= LOGIT_TOL


def test_decode_steps_match_transformers(case: Case) -> None:
    ids = text_ids(case.path, PREFILL + DECODE_STEPS)
    theirs = their_forward(case.ref, ids).logits[0].numpy()[PREFILL - 1 :]
    ours = decode_logits(case.model, ids, PREFILL)
    if case.name == "mistral":
        assert case.model.make_cache()[0].max_size == WINDOW < PREFILL + DECODE_STEPS
    per_step = np.abs(ours - theirs).max(axis=-1)
    print(f"{case.name} decode: max |diff| {per_step.max():.2e} over {DECODE_STEPS} steps")
    assert per_step.max() <= LOGIT_TOL, per_step


def test_greedy_generation_matches_transformers(case: Case) -> None:
    prompt = text_ids(case.path, SHORT)
    n_new = 32
    cache = case.model.make_cache()
    logits = our_logits(case.model, prompt, cache)[-1]
    ours = []
    for _ in range(n_new):
        token = int(np.argmax(logits))
        ours.append(token)
        logits = our_logits(case.model, np.array([token]), cache)[0]
    with torch.no_grad():
        out = case.ref.generate(
            torch.tensor(prompt)[None],
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            eos_token_id=None,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    assert len(theirs) == n_new
    assert ours == theirs


def test_explicit_attention_matches_fused(case: Case) -> None:
    """Arming the pattern switches every layer to explicit attention; logits must not move,
    for one-token decode steps past the window and for a prompt fed in chunks."""
    ids = text_ids(case.path, PREFILL + DECODE_STEPS)
    fused = (decode_logits(case.model, ids, PREFILL), chunked_logits(case.model, ids, 7))
    points = {k: v for k, v in case.model.hook_points().items() if k.endswith("attention_pattern")}
    calls = []

    def identity(hp: Any, x: mx.array, ctx: dict) -> mx.array:
        calls.append(hp.name)
        return x

    with armed(points, identity):
        explicit = (decode_logits(case.model, ids, PREFILL), chunked_logits(case.model, ids, 7))
    n_chunks = -(-len(ids) // 7)
    assert len(calls) == 3 * (1 + DECODE_STEPS + n_chunks)  # every layer, every pass
    decode, chunked = max_diff(explicit[0], fused[0]), max_diff(explicit[1], fused[1])
    print(f"{case.name} explicit vs fused: max |diff| {decode:.2e} (decode), {chunked:.2e} (chunked)")
    assert decode <= PATHS_TOL and chunked <= PATHS_TOL


@pytest.mark.parametrize("layer", [0, 2])
def test_attention_pattern_matches_transformers(case: Case, layer: int) -> None:
    """Prefill and every decode step: each captured row against transformers' row, column by
    column through key_positions; transformers puts no mass outside those columns."""
    ids = text_ids(case.path, PREFILL + DECODE_STEPS)
    ref_attn = their_forward(case.ref, ids, output_attentions=True).attentions[layer][0].numpy()
    captured: list[tuple[np.ndarray, np.ndarray]] = []

    def record(hp: Any, x: mx.array, ctx: dict) -> mx.array:
        captured.append((np.array(x[0]), np.array(ctx["key_positions"])))
        return x

    hp = case.model.hook_points()[f"layers.{layer}.attention_pattern"]
    with armed({hp.name: hp}, record):
        decode_logits(case.model, ids, PREFILL)
    assert len(captured) == 1 + DECODE_STEPS

    worst = 0.0
    row_starts = [0] + list(range(PREFILL, PREFILL + DECODE_STEPS))
    for (probs, positions), start in zip(captured, row_starts):
        rows = np.arange(start, start + probs.shape[1])
        theirs = ref_attn[:, rows][:, :, positions]
        worst = max(worst, max_diff(probs, theirs))
        np.testing.assert_allclose(theirs.sum(-1), 1.0, atol=1e-5)
        if case.name == "mistral" and start >= PREFILL:
            assert probs.shape[-1] == WINDOW
    print(f"{case.name} layer {layer} pattern: max |diff| {worst:.2e}")
    assert worst <= PATTERN_TOL


def test_residual_stream_matches_hidden_states(case: Case) -> None:
    ids = text_ids(case.path, SHORT)
    hidden = [h[0].numpy() for h in their_forward(case.ref, ids, output_hidden_states=True).hidden_states]
    points = case.model.hook_points()
    names = ["embedding"] + [f"layers.{i}.residual" for i in range(2)] + ["final_norm"]
    captured: dict[str, np.ndarray] = {}

    def record(hp: Any, x: mx.array, ctx: dict) -> mx.array:
        captured[hp.name] = np.array(x[0])
        return x

    with armed({n: points[n] for n in names}, record):
        our_logits(case.model, ids, case.model.make_cache())
    # transformers' last hidden state is the final norm's output; the others are block outputs.
    diffs = {n: max_diff(captured[n], hidden[i]) for i, n in enumerate(names)}
    print(f"{case.name} hidden states: {diffs}")
    assert max(diffs.values()) <= HIDDEN_TOL, diffs


def test_layer_types_from_config() -> None:
    """Older Qwen2 configs carry no layer_types; a window applies only with use_sliding_window."""
    base = dict(
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=384,
    )
    qwen_off = ModelArgs.from_dict(
        {**base, "model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}
    )
    assert qwen_off.sliding_window is None and qwen_off.layer_types == ["full_attention"] * 3
    assert qwen_off.rope_theta == 1000000.0 and qwen_off.qkv_bias and not qwen_off.o_bias
    qwen_on = ModelArgs.from_dict(
        {**base, "model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}
    )
    assert qwen_on.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    mistral = ModelArgs.from_dict(
        {**base, "model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention"] * 3}
    )
    assert mistral.layer_types == ["sliding_attention"] * 3
    llama = ModelArgs.from_dict(
        {**base, "model_type": "llama", "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    )
    assert llama.layer_types == ["full_attention"] * 3 and not llama.qkv_bias
    assert llama.rope_theta == 5e5 and llama.rope_scaling["rope_type"] == "linear"
    assert llama.rope_scaling["factor"] == 2.0


def test_extra_configs_match_transformers(extra_case: Case) -> None:
    model = extra_case.model
    if extra_case.name == "qwen2-sliding-layers":
        assert model.args.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        caches = [type(c).__name__ for c in model.make_cache()]
        assert caches == ["KVCache", "RotatingKVCache", "RotatingKVCache"]
    ids = text_ids(extra_case.path, LONG)
    theirs = their_forward(extra_case.ref, ids).logits[0].numpy()
    prompt = max_diff(our_logits(model, ids), theirs)
    decode = max_diff(
        decode_logits(model, ids[: PREFILL + DECODE_STEPS], PREFILL), theirs[PREFILL - 1 : PREFILL + DECODE_STEPS]
    )
    print(f"{extra_case.name}: prompt {prompt:.2e}, decode {decode:.2e}")
    assert prompt <= LOGIT_TOL and decode <= LOGIT_TOL


# --- mlx-lm and quantization -------------------------------------------------------------


def mlx_lm_readable(src: Path, dst: Path) -> Path:
    """A copy whose config carries rope_theta / rope_scaling, the only keys mlx-lm 0.32 reads."""
    if not dst.exists():
        shutil.copytree(src, dst)
        config = normalize_rope_config(json.loads((src / "config.json").read_text()))
        config.pop("rope_parameters", None)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def mlx_lm_ids(case: Case) -> tuple[np.ndarray, int]:
    """Tokens and prefill length for the mlx-lm comparison.

    mlx-lm 0.32's llama.py windows only layers that `layer_types` marks sliding, and cannot
    build a model whose layers are all sliding, so it runs Mistral with full attention.
    Mistral is compared where the window cuts nothing: 8 tokens in all.
    """
    if case.name == "mistral":
        return text_ids(case.path, WINDOW), WINDOW // 2
    return text_ids(case.path, LONG), LONG - 8


@pytest.mark.parametrize("quant", [None, (4, 64), (4, 32)], ids=["float", "q4g64", "q4g32"])
def test_logits_match_mlx_lm(case: Case, quant: Any, tmp_path: Path) -> None:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    if quant is None:
        ours_path = case.path
        theirs_path = mlx_lm_readable(case.path, tmp_path / "mlx_lm")
    else:
        bits, group = quant
        ours_path = theirs_path = quantize_checkpoint(case.path, tmp_path / "q", bits=bits, group_size=group)
    ours = load_model(ours_path).model
    theirs, _ = mlx_lm_load_model(theirs_path)
    assert type(theirs).__module__.startswith("mlx_lm.")
    if quant is not None:
        assert isinstance(ours.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert isinstance(theirs.layers[0].self_attn.q_proj, nn.QuantizedLinear)

    ids, prefill = mlx_lm_ids(case)
    prompt = max_diff(our_logits(ours, ids), our_logits(theirs, ids))
    decode = max_diff(decode_logits(ours, ids, prefill), decode_logits(theirs, ids, prefill))
    print(f"{case.name} {quant or 'float'} vs mlx-lm: prompt {prompt:.2e}, decode {decode:.2e}")
    assert prompt <= LOGIT_TOL and decode <= LOGIT_TOL


def dequantized_parameters(model: nn.Module) -> list[tuple[str, mx.array]]:
    """Every parameter of a quantized model, each quantized weight replaced by mx.dequantize of it."""
    params = dict(tree_flatten(model.parameters()))
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            out[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits
            )
            for name in ("weight", "scales", "biases"):
                params.pop(f"{path}.{name}")
    out.update(params)
    return list(out.items())


@pytest.mark.parametrize("group", [64, 32])
def test_quantized_matches_dequantized(case: Case, group: int, tmp_path: Path) -> None:
    quantized = load_model(quantize_checkpoint(case.path, tmp_path / "q", bits=4, group_size=group)).model
    dense = load_model(case.path).model
    weights = dequantized_parameters(quantized)
    dense.load_weights(weights, strict=True)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())

    ids = text_ids(case.path, PREFILL + DECODE_STEPS)
    prompt = max_diff(our_logits(quantized, ids), our_logits(dense, ids))
    decode = max_diff(decode_logits(quantized, ids, PREFILL), decode_logits(dense, ids, PREFILL))
    # The quantized model is a different model: it must differ from the float checkpoint.
    float_gap = max_diff(our_logits(quantized, ids), our_logits(case.model, ids))
    print(f"{case.name} q4g{group} vs dequantized: prompt {prompt:.2e}, decode {decode:.2e}; float gap {float_gap:.2f}")
    assert float_gap > 1e-2
    assert prompt <= DEQUANT_TOL and decode <= DEQUANT_TOL
