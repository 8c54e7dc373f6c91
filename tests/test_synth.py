"""Synthetic checkpoints: exact published shapes, loadable, generating, and written in bounded memory.

The expected values below are the published configs (openai/gpt-oss-20b and -120b,
meta-llama/Llama-3.2-1B and Llama-3.1-8B), typed here independently of the table in
mlx_engine/tools/synth/presets.py so that a wrong entry there fails.
"""

from __future__ import annotations

import gc
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlx_engine.tools import synth

PUBLISHED: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": {
        "model_type": "gpt_oss",
        "num_hidden_layers": 24,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 201088,
        "sliding_window": 128,
        "rope_theta": 150000,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "original_max_position_embeddings": 4096, "truncate": False},
        "max_position_embeddings": 131072,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
    },
    "gpt-oss-120b": {
        "model_type": "gpt_oss",
        "num_hidden_layers": 36,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 201088,
        "sliding_window": 128,
        "rope_theta": 150000,
        "tie_word_embeddings": False,
    },
    "llama-1b": {
        "model_type": "llama",
        "num_hidden_layers": 16,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True,
    },
    "llama-8b": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "llama-125m": {"model_type": "llama", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                   "vocab_size": 32000},
    "gpt-oss-moe-1b": {"model_type": "gpt_oss", "num_local_experts": 32, "num_experts_per_tok": 4, "head_dim": 64,
                       "vocab_size": 201088, "sliding_window": 128},
}

# gpt-oss-120b at full width is 3.2B parameters per layer; one layer keeps the test at a
# 2.5 GB checkpoint while still holding all 128 experts of the published size.
TEST_LAYERS = {name: 2 for name in synth.ARCHITECTURES} | {"gpt-oss-120b": 1}


def safetensors_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    shapes = {}
    for f in sorted(path.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def test_every_named_architecture_has_published_values() -> None:
    assert set(PUBLISHED) == set(synth.ARCHITECTURES)
    for name, expected in PUBLISHED.items():
        config = synth.architecture_config(name)
        for key, value in expected.items():
            assert config[key] == value, (name, key)


def test_gpt_oss_shapes_agree_with_transformers_defaults() -> None:
    """transformers' GptOssConfig defaults are the published 120b widths (36 layers, 128 experts)."""
    from transformers import GptOssConfig

    ref = GptOssConfig()
    config = synth.architecture_config("gpt-oss-120b")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "sliding_window", "num_local_experts", "num_hidden_layers", "num_experts_per_tok"):
        assert config[key] == getattr(ref, key), key


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b", "llama-1b"])
def test_full_size_plan_matches_the_architecture(name: str) -> None:
    """The full model's tensor list, planned without writing: counts and quantized shapes."""
    config = synth.architecture_config(name)
    plans, written = synth.plan_tensors(config, "bfloat16", 4, 32)
    by_name = {p.name: p for p in plans}
    h, v = config["hidden_size"], config["vocab_size"]
    assert by_name["model.embed_tokens.weight"].shape == (v, h * 4 // 32)
    assert by_name["model.embed_tokens.scales"].shape == (v, h // 32)
    assert written["quantization"]["bits"] == 4 and written["quantization"]["group_size"] == 32
    if config["model_type"] == "gpt_oss":
        e, i = config["num_local_experts"], config["intermediate_size"]
        assert by_name["model.layers.0.mlp.experts.gate_proj.weight"].shape == (e, i, h * 4 // 32)
        assert by_name["model.layers.0.mlp.experts.down_proj.weight"].shape == (e, h, i * 4 // 32)
        # Routing stays at 8 bits, as mlx-community converts gpt-oss.
        assert written["quantization"]["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}
        assert by_name["model.layers.0.mlp.router.weight"].shape == (e, h * 8 // 32)
        assert by_name["lm_head.weight"].shape == (v, h * 4 // 32)
        billions = synth.logical_parameters(plans) / 1e9
        assert billions == pytest.approx(20.9 if name == "gpt-oss-20b" else 116.8, abs=0.2)
    else:
        assert "lm_head.weight" not in by_name  # tied embeddings
        assert synth.logical_parameters(plans) / 1e9 == pytest.approx(1.236, abs=0.01)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("gpt-oss-1") else n for n in sorted(synth.ARCHITECTURES)]
)
def test_synth_loads_and_generates(name: str, tmp_path: Path) -> None:
    import mlx.core as mx

    import mlx_engine

    layers = TEST_LAYERS[name]
    # float32 scales: MLX's CPU quantized kernels are far slower with half-precision ones.
    report = synth.synthesize(name, tmp_path / name, bits=4, group_size=64, layers=layers, dtype="float32")
    config = json.loads((tmp_path / name / "config.json").read_text())
    expected = synth.architecture_config(name)
    for key, value in expected.items():
        if key not in ("num_hidden_layers", "layer_types", "torch_dtype"):
            assert config[key] == value, key
    assert config["num_hidden_layers"] == layers
    assert config["quantization"]["bits"] == 4

    kit = mlx_engine.load_model(tmp_path / name)
    try:
        info = kit.arch_info
        assert (info.num_layers, info.d_model, info.n_heads, info.n_kv_heads, info.head_dim, info.vocab_size) == (
            layers, expected["hidden_size"], expected["num_attention_heads"], expected["num_key_value_heads"],
            expected.get("head_dim") or expected["hidden_size"] // expected["num_attention_heads"],
            expected["vocab_size"],
        )
        assert len(kit.tokenizer.get_vocab()) == expected["vocab_size"]
        assert kit.is_harmony == (expected["model_type"] == "gpt_oss")
        chat = mlx_engine.chat_tokens(kit, [{"role": "user", "content": "Hi"}])
        assert kit.tokenizer.decode(chat).count("Hi") == 1
        # One prompt token: the LM head over a 128k-201k vocabulary is most of the work.
        prompt = mlx_engine.tokenize(kit, "Hi", add_special_tokens=False)[:1]
        kit.tokenizer.eos_token_ids = []  # random weights: make sure two tokens come out
        results = list(mlx_engine.create_generator(kit, prompt, max_tokens=2))
        assert [r.generation_tokens for r in results] == [1, 2]
        assert all(0 <= r.token < expected["vocab_size"] for r in results)
        assert all(mx.isfinite(mx.array(r.logprob)).item() for r in results)
        shapes = safetensors_shapes(tmp_path / name)
        h = expected["hidden_size"]
        assert shapes["model.embed_tokens.weight"] == ("U32", [expected["vocab_size"], h * 4 // 32])
        assert report.bytes_written == sum(
            math.prod(shape) * synth.DTYPE_BYTES[dtype] for dtype, shape in shapes.values()
        )
    finally:
        del kit
        gc.collect()
        mx.clear_cache()


@pytest.mark.slow
def test_activations_stay_finite_through_every_layer(tmp_path: Path) -> None:
    import mlx.core as mx

    import mlx_engine

    synth.synthesize("gpt-oss-moe-1b", tmp_path / "m", bits=4, layers=12, dtype="float32")
    kit = mlx_engine.load_model(tmp_path / "m")
    out = mlx_engine.run_with_cache(kit, list(range(100, 140)), [{"layer_name": i, "component": "residual"} for i in range(12)])
    for i in range(12):
        r = out[f"layers.{i}.residual"].astype(mx.float32)
        assert mx.isfinite(r).all().item()
        assert 0.05 < mx.sqrt(mx.mean(r * r)).item() < 100.0
    assert mx.isfinite(out.logits.astype(mx.float32)).all().item()


def _synth_peak_rss(args: list[str]) -> tuple[int, int]:
    """Run synth in a fresh process; returns (its peak RSS in bytes, bytes of weights written)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child forked from a
    # large pytest process would report the parent's size.
    code = (
        "import sys\n"
        "from mlx_engine.tools.synth.cli import main\n"
        "main(sys.argv[1:])\n"
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('PEAK', int(hwm.split()[1]) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    peak = int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK")))
    folder = Path(args[args.index("--out") + 1])
    size = sum(f.stat().st_size for f in folder.glob("model*.safetensors"))
    return peak, size


@pytest.mark.slow
def test_synth_streams_in_bounded_memory(tmp_path: Path) -> None:
    """A 1 GB checkpoint is written with no more memory than a tiny one plus a few chunks."""
    tiny_peak, _ = _synth_peak_rss(["--like", "llama-125m", "--layers", "1", "--bits", "4", "--out", str(tmp_path / "t")])
    mid_peak, mid_size = _synth_peak_rss(
        ["--like", "llama-1b", "--layers", "4", "--dtype", "bfloat16", "--shard-gb", "0.5", "--out", str(tmp_path / "m")]
    )
    assert mid_size > 1.0e9
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) >= 2
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    # Chunks are 8M elements (32 MB as float32, plus conversions); the model never is whole.
    assert mid_peak - tiny_peak < 300 * 2**20, (tiny_peak, mid_peak, mid_size)
    assert mid_peak < 0.6 * mid_size
