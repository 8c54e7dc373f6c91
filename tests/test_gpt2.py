"""Native GPT-2 against transformers (float32, eager) and mlx-lm.

Tiny random checkpoint written by transformers 5: 3 layers, 4 heads, n_embd 64,
n_positions 512, tied LM head, keys under `transformer.` and Conv1D weights stored
[in, out]. Logits are of order 1 to 6; every tolerance below is absolute.
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
from safetensors.numpy import load_file, save_file
from tiny_checkpoints import build_gpt2, load_reference, training_text

from mlx_engine.tools.convert import quantize_checkpoint
from mlx_engine.loading import ModelKit, load_model

LOGIT_TOL = 1e-4  # ours vs transformers, and ours vs mlx-lm on the same weights
PATHS_TOL = 1e-5  # our explicit attention vs our fused attention
PATTERN_TOL = 1e-5  # our attention probabilities vs transformers' output_attentions
HIDDEN_TOL = 1e-4  # captured residual stream vs transformers' hidden_states
DEQUANT_TOL = 1e-4  # quantized matmuls vs the same weights dequantized to float32
N_LAYERS = 3
SHORT, LONG = 20, 256
PREFILL, DECODE_STEPS = 12, 24

# Beyond the default: an untied LM head, exact GELU, n_inner != 4 * n_embd, and
# attention scaled down by the layer index.
EXTRA_CONFIGS = {
    "gpt2-untied-gelu-inverse-scale": dict(
        tie_word_embeddings=False,
        activation_function="gelu",
        n_inner=96,
        scale_attn_by_inverse_layer_idx=True,
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


@contextmanager
def armed(points: dict[str, Any], fn: Callable) -> Iterator[None]:
    for hp in points.values():
        hp.fn = fn
    try:
        yield
    finally:
        for hp in points.values():
            hp.fn = None


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    path, _ = build_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2")
    return Case("gpt2", path, load_model(path), load_reference(path, "GPT2LMHeadModel"))


@pytest.fixture(scope="module", params=list(EXTRA_CONFIGS))
def extra_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    path, _ = build_gpt2(tmp_path_factory.mktemp("gpt2_extra") / request.param, **EXTRA_CONFIGS[request.param])
    return Case(request.param, path, load_model(path), load_reference(path, "GPT2LMHeadModel"))


def test_checkpoint_layout_and_hook_points(case: Case) -> None:
    """transformers 5 writes `transformer.`-prefixed keys and no n_ctx; both are read."""
    keys = load_file(case.path / "model.safetensors").keys()
    assert "transformer.h.0.attn.c_attn.weight" in keys
    assert "n_ctx" not in json.loads((case.path / "config.json").read_text())
    assert case.model.args.n_positions == 512
    assert case.model.layers[0].attn.c_attn.weight.shape == (192, 64)
    info = case.kit.arch_info
    assert (info.num_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (N_LAYERS, 4, 4, 16)
    assert info.block_prefix == "transformer.h"
    points = case.model.hook_points()
    assert "embedding" in points and "final_norm" in points and "layers.2.attention_pattern" in points
    assert "layers.0.router" not in points


@pytest.mark.parametrize("n", [SHORT, LONG])
def test_prompt_logits_match_transformers(case: Case, n: int) -> None:
    ids = text_ids(case.path, n)
    theirs = their_forward(case.ref, ids).logits[0].numpy()
    no_cache = max_diff(our_logits(case.model, ids), theirs)
    with_cache = max_diff(our_logits(case.model, ids, case.model.make_cache()), theirs)
    print(f"gpt2 prompt {n}: max |diff| {no_cache:.2e} (no cache), {with_cache:.2e} (cache)")
    assert no_cache <= LOGIT_TOL and with_cache <= LOGIT_TOL


def test_decode_steps_match_transformers(case: Case) -> None:
    """Decode steps read positions from wpe at the cache offset."""
    ids = text_ids(case.path, PREFILL + DECODE_STEPS)
    theirs = their_forward(case.ref, ids).logits[0].numpy()[PREFILL - 1 :]
    per_step = np.abs(decode_logits(case.model, ids, PREFILL) - theirs).max(axis=-1)
    print(f"gpt2 decode: max |diff| {per_step.max():.2e} over {DECODE_STEPS} steps")
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
    ids = text_ids(case.path, PREFILL + DECODE_STEPS)
    fused = decode_logits(case.model, ids, PREFILL)
    points = {k: v for k, v in case.model.hook_points().items() if k.endswith("attention_pattern")}
    calls = []

    def identity(hp: Any, x: mx.array, ctx: dict) -> mx.array:
        calls.append(hp.name)
        return x

    with armed(points, identity):
        explicit = decode_logits(case.model, ids, PREFILL)
    assert len(calls) == N_LAYERS * (1 + DECODE_STEPS)
    diff = max_diff(explicit, fused)
    print(f"gpt2 explicit vs fused: max |diff| {diff:.2e}")
    assert diff <= PATHS_TOL


@pytest.mark.parametrize("layer", [0, 2])
def test_attention_pattern_matches_transformers(case: Case, layer: int) -> None:
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
        np.testing.assert_array_equal(positions, np.arange(rows[-1] + 1))
        worst = max(worst, max_diff(probs, ref_attn[:, rows][:, :, positions]))
    print(f"gpt2 layer {layer} pattern: max |diff| {worst:.2e}")
    assert worst <= PATTERN_TOL


def test_residual_stream_matches_hidden_states(case: Case) -> None:
    """`embedding` is wte + wpe, transformers' hidden_states[0]."""
    ids = text_ids(case.path, SHORT)
    hidden = [h[0].numpy() for h in their_forward(case.ref, ids, output_hidden_states=True).hidden_states]
    points = case.model.hook_points()
    names = ["embedding"] + [f"layers.{i}.residual" for i in range(N_LAYERS - 1)] + ["final_norm"]
    captured: dict[str, np.ndarray] = {}

    def record(hp: Any, x: mx.array, ctx: dict) -> mx.array:
        captured[hp.name] = np.array(x[0])
        return x

    with armed({n: points[n] for n in names}, record):
        cache = case.model.make_cache()
        our_logits(case.model, ids[:4], cache)
        our_logits(case.model, ids[4:], cache)  # a second chunk: positions continue at offset 4
    # transformers' last hidden state is ln_f's output; the others are block outputs.
    diffs = {n: max_diff(captured[n], hidden[i][4:]) for i, n in enumerate(names)}
    print(f"gpt2 hidden states (second chunk): {diffs}")
    assert max(diffs.values()) <= HIDDEN_TOL, diffs


def test_extra_configs_match_transformers(extra_case: Case) -> None:
    model = extra_case.model
    assert "lm_head" in model and model.layers[0].mlp.c_fc.weight.shape == (96, 64)
    ids = text_ids(extra_case.path, LONG)
    theirs = their_forward(extra_case.ref, ids).logits[0].numpy()
    prompt = max_diff(our_logits(model, ids), theirs)
    decode = max_diff(
        decode_logits(model, ids[: PREFILL + DECODE_STEPS], PREFILL), theirs[PREFILL - 1 : PREFILL + DECODE_STEPS]
    )
    print(f"{extra_case.name}: prompt {prompt:.2e}, decode {decode:.2e}")
    assert prompt <= LOGIT_TOL and decode <= LOGIT_TOL


# --- mlx-lm and quantization -------------------------------------------------------------


def mlx_lm_readable(src: Path, dst: Path, strip_prefix: bool) -> Path:
    """A copy mlx-lm 0.32's gpt2.py can read.

    Its ModelArgs requires `n_ctx`, which transformers 5 no longer writes, and its
    sanitize transposes Conv1D weights only under bare `h.{i}` keys: the `transformer.`
    prefix transformers 5 writes makes its strict load fail. The stripped copy also gets
    the causal-mask buffers older GPT-2 checkpoints carry, which both loaders must drop.
    """
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if strip_prefix:
        weights = load_file(src / "model.safetensors")
        weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
        n = config["n_positions"]
        for i in range(config["n_layer"]):
            weights[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), dtype=np.float32))[None, None]
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("quant", [None, (4, 64), (4, 32)], ids=["float", "q4g64", "q4g32"])
def test_logits_match_mlx_lm(case: Case, quant: Any, tmp_path: Path) -> None:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    if quant is None:
        theirs_path = mlx_lm_readable(case.path, tmp_path / "mlx_lm", strip_prefix=True)
        # Both loaders read the bare-key layout; ours reads the transformers 5 layout too.
        ours_models = [case.model, load_model(theirs_path).model]
    else:
        bits, group = quant
        ours_path = quantize_checkpoint(case.path, tmp_path / "q", bits=bits, group_size=group)
        theirs_path = mlx_lm_readable(ours_path, tmp_path / "mlx_lm", strip_prefix=False)
        ours_models = [load_model(ours_path).model]
        assert isinstance(ours_models[0].layers[0].attn.c_proj, nn.QuantizedLinear)
    theirs, _ = mlx_lm_load_model(theirs_path)
    assert type(theirs).__module__ == "mlx_lm.models.gpt2"

    ids = text_ids(case.path, LONG)
    reference_prompt = our_logits(theirs, ids)
    reference_decode = decode_logits(theirs, ids, LONG - 8)
    for ours in ours_models:
        prompt = max_diff(our_logits(ours, ids), reference_prompt)
        decode = max_diff(decode_logits(ours, ids, LONG - 8), reference_decode)
        print(f"gpt2 {quant or 'float'} vs mlx-lm: prompt {prompt:.2e}, decode {decode:.2e}")
        assert prompt <= LOGIT_TOL and decode <= LOGIT_TOL


def test_loads_mlx_lm_converted_checkpoint(case: Case, tmp_path: Path) -> None:
    """mlx-lm writes `model.h.{i}` keys with Linear weights; ours must not transpose them again
    (attn.c_proj is square, so a wrong transpose would still load)."""
    from mlx_lm import convert

    readable = mlx_lm_readable(case.path, tmp_path / "readable", strip_prefix=True)
    converted = tmp_path / "converted"
    convert(str(readable), str(converted), dtype="float32")
    assert "model.h.0.attn.c_proj.weight" in load_file(converted / "model.safetensors")
    ids = text_ids(case.path, SHORT)
    diff = max_diff(our_logits(load_model(converted).model, ids), our_logits(case.model, ids))
    print(f"gpt2 mlx-lm converted vs transformers layout: {diff:.2e}")
    assert diff <= LOGIT_TOL


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
    dense.load_weights(dequantized_parameters(quantized), strict=True)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in dense.named_modules())

    ids = text_ids(case.path, PREFILL + DECODE_STEPS)
    prompt = max_diff(our_logits(quantized, ids), our_logits(dense, ids))
    decode = max_diff(decode_logits(quantized, ids, PREFILL), decode_logits(dense, ids, PREFILL))
    # The quantized model is a different model: it must differ from the float checkpoint.
    float_gap = max_diff(our_logits(quantized, ids), our_logits(case.model, ids))
    print(f"gpt2 q4g{group} vs dequantized: prompt {prompt:.2e}, decode {decode:.2e}; vs float {float_gap:.2f}")
    assert float_gap > 1e-2
    assert prompt <= DEQUANT_TOL and decode <= DEQUANT_TOL
