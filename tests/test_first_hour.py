"""What a newcomer meets in the first hour: `mlx-engine generate --chat` on the default (Harmony)
model, and `mlx-engine convert` of a model that is already quantized.

- `generate --chat` prints the final channel, never the raw `<|channel|>` markers, and the
  text equals the content the server's chat route returns for the same greedy request;
  `--show-reasoning` labels the channels it prints.
- `convert` of a quantized model refuses and says what it can do instead; `--requantize`
  dequantizes then quantizes, warns that the errors compound, and writes a checkpoint that
  loads and computes nearly the logits of the model it came from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import requests
from neuroscope_server import running_server

import mlx_engine
from mlx_engine.loading import DEFAULT_MODEL_DIR

PROMPT = "Write a Python function."
MARKERS = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>")

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the embedded default model is not in this checkout")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlx_engine.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_generate_chat_prints_the_final_channel_as_the_server_answers(tmp_path: Path) -> None:
    done = cli("generate", "--chat", "--prompt", PROMPT, "--max-tokens", "24", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any(marker in done.stdout for marker in MARKERS), done.stdout
    with running_server() as url:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0}
        reply = requests.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    content = reply["choices"][0]["message"]["content"]
    assert content and done.stdout == content + "\n"
    shown = cli("generate", "--chat", "--show-reasoning", "--prompt", PROMPT, "--max-tokens", "24", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "── answer (final channel) ──\n" + content + "\n"
    raw = cli("generate", "--prompt", PROMPT, "--max-tokens", "4", cwd=tmp_path)  # no chat: the text as generated
    assert raw.returncode == 0 and raw.stdout.strip()


def test_convert_refuses_a_quantized_model_and_requantize_does_it_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "requantized"
    refused = cli("convert", "--model", "default", "--out", str(out), cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "already quantized (4-bit, group size 32" in refused.stderr and "--requantize" in refused.stderr
    assert "original float checkpoint" in refused.stderr and not out.exists()

    done = cli("convert", "--model", "default", "--out", str(out), "--requantize", "--bits", "8", "--group-size", "64", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: re-quantizing default" in done.stderr and "compound" in done.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (8, 64)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()

    original, requantized = mlx_engine.load_model("default"), mlx_engine.load_model(str(out))
    ids = mx.array([mlx_engine.tokenize(original, "def add(a, b):\n    return a + b\n")])
    a = np.array(original.model(ids).astype(mx.float32))
    b = np.array(requantized.model(ids).astype(mx.float32))
    # 8 bits over the 4-bit weights: a small extra error, not a different model. A MoE may route a
    # token to another expert where two router logits were close, which moves that position more.
    per_position = np.abs(a - b).max(axis=-1)[0] / np.abs(a).max()
    assert np.median(per_position) < 0.01 and (per_position < 0.01).mean() >= 0.75, per_position
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75
