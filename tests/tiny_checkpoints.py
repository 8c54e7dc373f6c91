"""Tiny random checkpoints written by transformers itself, so tests exercise the real
loading code on what transformers 5 saves.

Weights are re-initialised with a spread well above transformers' default 0.02: at
0.02 every model looks right (a wrong YaRN correction hides below 3e-6 there).
"""

from __future__ import annotations

import inspect
import json
import json.decoder
import json.encoder
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mlx_engine.tools.chat_templates import HARMONY_CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE

WEIGHT_SPREAD = 0.15
VOCAB_SIZE = 384

HARMONY_SPECIAL = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|constrain|>", "<|call|>"]
PLAIN_SPECIAL = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]

def training_text() -> str:
    """Deterministic English-and-code text: the json package's own source."""
    return "\n".join(inspect.getsource(m) for m in (json, json.decoder, json.encoder))


def build_tokenizer(out_dir: Path, harmony: bool = False) -> PreTrainedTokenizerFast:
    special = HARMONY_SPECIAL + ["<|endoftext|>"] if harmony else PLAIN_SPECIAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([training_text()], trainer=trainer)
    if harmony:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|return|>", pad_token="<|endoftext|>", bos_token=None
        )
        fast.chat_template = HARMONY_CHAT_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>"
        )
        fast.chat_template = PLAIN_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def spread_weights(model: torch.nn.Module, spread: float = WEIGHT_SPREAD, seed: int = 0) -> None:
    """Re-initialise every parameter: norms near 1, everything else N(0, spread)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * spread
            if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + noise if name.endswith("weight") else noise)
            else:
                p.copy_(noise)


def _save(model: Any, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_llama(out_dir: Path, variant: str = "llama", seed: int = 0, **overrides: Any):
    """Llama, Qwen2 (q/k/v bias) or Mistral (sliding window) with 3 layers and GQA."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = build_tokenizer(out_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if variant == "llama":
        config = LlamaConfig(**{**common, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **overrides})
        model = LlamaForCausalLM(config)
    elif variant == "qwen2":
        config = Qwen2Config(**{**common, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, **overrides})
        model = Qwen2ForCausalLM(config)
    elif variant == "mistral":
        config = MistralConfig(
            **{**common, "sliding_window": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **overrides}
        )
        model = MistralForCausalLM(config)
    else:
        raise ValueError(f"unknown llama variant {variant!r}")
    spread_weights(model, seed=seed)
    model.eval()
    return _save(model, tokenizer, out_dir), model


def build_gpt2(out_dir: Path, seed: int = 0, **overrides: Any):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer(out_dir)
    config = GPT2Config(
        **{
            "vocab_size": len(tokenizer),
            "n_embd": 64,
            "n_layer": 3,
            "n_head": 4,
            "n_positions": 512,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **overrides,
        }
    )
    model = GPT2LMHeadModel(config)
    spread_weights(model, seed=seed)
    model.eval()
    return _save(model, tokenizer, out_dir), model


def build_gpt_oss(out_dir: Path, seed: int = 0, **overrides: Any):
    """gpt-oss in the layout transformers 5 writes: fused interleaved gate_up_proj, rope_parameters."""
    from transformers import GptOssConfig, GptOssForCausalLM

    tokenizer = build_tokenizer(out_dir, harmony=True)
    config = GptOssConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
            "tie_word_embeddings": False,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **overrides,
        }
    )
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config)
    spread_weights(model, seed=seed)
    model.eval()
    return _save(model, tokenizer, out_dir), model


def load_reference(path: Path, cls_name: str):
    """The transformers model from a folder, float32 with eager attention."""
    import transformers

    cls = getattr(transformers, cls_name)
    model = cls.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def read_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
