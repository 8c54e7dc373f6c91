"""Loading: what loads, and the clear errors for what does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import mlx_engine
from mlx_engine import ModelLoadError


def test_local_folder_loads_native(llama_kit) -> None:
    assert llama_kit.native
    assert llama_kit.model_type == "llama"
    assert llama_kit.arch_info.num_layers == 3
    assert mlx_engine.tokenize(llama_kit, "import json")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        mlx_engine.load_model(tmp_path)


def test_config_without_model_type(tmp_path: Path, llama_checkpoint: Path) -> None:
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model_type"):
        mlx_engine.load_model(tmp_path / "m")


def test_unknown_model_type(tmp_path: Path, llama_checkpoint: Path) -> None:
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="Unknown model_type 'no_such_architecture'.*mlx-lm cannot load it"):
        mlx_engine.load_model(tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors_names_the_file(tmp_path: Path, llama_checkpoint: Path, damage: str) -> None:
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    with pytest.raises(ModelLoadError, match="model.safetensors is not a valid safetensors file"):
        mlx_engine.load_model(tmp_path / "m")


def test_missing_weights(tmp_path: Path, llama_checkpoint: Path) -> None:
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="No model\\*.safetensors"):
        mlx_engine.load_model(tmp_path / "m")


def test_missing_local_path_and_not_a_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found: no local folder"):
        mlx_engine.load_model(tmp_path / "nowhere" / "deeper" / "model")


def test_repo_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="'mlx-community/no-such-model'.*(offline|download failed)"):
        mlx_engine.load_model("mlx-community/no-such-model")


def test_rope_parameters_are_honoured(tmp_path: Path, llama_checkpoint: Path) -> None:
    """transformers 5's rope_parameters must reach the model (mlx-lm 0.32 ignores it)."""
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500.0
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    kit = mlx_engine.load_model(tmp_path / "m")
    assert kit.config["rope_theta"] == 500.0
    assert kit.model.args.rope_theta == 500.0


def test_convert_round_trip(tmp_path: Path, llama_checkpoint: Path) -> None:
    from mlx_engine.tools.convert import quantize_checkpoint

    out = quantize_checkpoint(llama_checkpoint, tmp_path / "q4", bits=4, group_size=32)
    kit = mlx_engine.load_model(out)
    assert kit.config["quantization"]["bits"] == 4
    assert kit.config["quantization"]["group_size"] == 32
    tokens = [r.token for r in mlx_engine.create_generator(kit, mlx_engine.tokenize(kit, "def f"), max_tokens=4)]
    assert len(tokens) == 4
    with pytest.raises(FileExistsError):
        quantize_checkpoint(llama_checkpoint, out)


def test_chat_tokens_use_the_checkpoint_template(llama_kit) -> None:
    ids = mlx_engine.chat_tokens(llama_kit, [{"role": "user", "content": "hi"}])
    text = llama_kit.tokenizer.decode(ids)
    assert text.startswith("<|bos|><|user|>hi<|eos|>") and text.endswith("<|assistant|>")
    with pytest.raises(ValueError, match="messages is empty"):
        mlx_engine.chat_tokens(llama_kit, [])
