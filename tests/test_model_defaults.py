"""Native models take transformers' defaults, and sanitize never drops a tensor transformers uses.

Each checkpoint is written by transformers, edited the way real configs differ (a key
left out, another activation), and our logits are compared with transformers' float32
eager forward on the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine import ModelLoadError

IDS = [1, 17, 42, 99, 123, 7, 250, 3]
LLAMA_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def edit_config(path: Path, **changes: object) -> None:
    """Set keys of config.json; a value of None removes the key."""
    config = tc.read_config(path)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def logits_gap(path: Path, cls_name: str) -> float:
    reference = tc.load_reference(path, cls_name)
    with torch.no_grad():
        expected = reference(torch.tensor([IDS])).logits[0].numpy()
    kit = mlx_engine.load_model(path)
    ours = np.array(kit.model(mx.array([IDS]))[0].astype(mx.float32))
    return float(np.abs(ours - expected).max())


@pytest.mark.parametrize("variant", sorted(LLAMA_CLASSES))
def test_omitted_tie_word_embeddings_means_an_untied_head(tmp_path: Path, variant: str) -> None:
    """LlamaConfig, MistralConfig and Qwen2Config default to an untied head: a config that omits
    the key must use the stored lm_head.weight, as transformers does."""
    path, _ = tc.build_llama(tmp_path / variant, variant)
    edit_config(path, tie_word_embeddings=None)
    assert "tie_word_embeddings" not in tc.read_config(path)
    assert logits_gap(path, LLAMA_CLASSES[variant]) < 1e-4


def test_untied_config_without_a_stored_head_is_refused(tmp_path: Path) -> None:
    path, _ = tc.build_llama(tmp_path / "m")
    edit_config(path, tie_word_embeddings=None)
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="no lm_head.weight.*omits tie_word_embeddings.*default for llama is false"):
        mlx_engine.load_model(path)


def test_tied_config_with_a_different_stored_head_is_refused(tmp_path: Path) -> None:
    """transformers keeps (and uses) a stored head that differs from the embedding, whatever the
    config says; dropping it would compute other logits, so the load is refused."""
    path, _ = tc.build_llama(tmp_path / "m")
    edit_config(path, tie_word_embeddings=True)
    with pytest.raises(ModelLoadError, match="lm_head.weight differs from model.embed_tokens.weight.*tie_word_embeddings"):
        mlx_engine.load_model(path)


def test_tied_config_with_the_embedding_as_head_loads(tmp_path: Path) -> None:
    """A stored head equal to the embedding is the tied head: dropping it loses nothing."""
    path, _ = tc.build_llama(tmp_path / "m")
    edit_config(path, tie_word_embeddings=True)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    assert logits_gap(path, "LlamaForCausalLM") < 1e-4


def test_gpt2_gelu_fast_is_the_tanh_form(tmp_path: Path) -> None:
    """transformers' gelu_fast is 0.5*x*(1+tanh(0.7978845608*x*(1+0.044715*x*x))), not x*sigmoid(1.702x)."""
    path, _ = tc.build_gpt2(tmp_path / "m", activation_function="gelu_fast")
    assert tc.read_config(path)["activation_function"] == "gelu_fast"
    assert logits_gap(path, "GPT2LMHeadModel") < 1e-4
