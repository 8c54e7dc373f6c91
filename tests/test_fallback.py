"""The mlx-lm fallback never lies: a checkpoint loads and equals transformers, or is refused by name.

Each checkpoint is a tiny random model written by transformers 5 itself, of an
architecture we have no native file for; its logits are compared with transformers'
float32 eager forward on the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

import mlx_engine
import tiny_checkpoints as tc
from mlx_engine import HookSpecError, ModelLoadError
from mlx_engine.models.fallback_rules import FALLBACK_RULES, GENERIC_CHECKS

IDS = [1, 17, 42, 99, 123, 7, 250, 3, 55, 66, 77, 88, 9, 10, 11, 12, 13]
SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, n_embd=64, n_layer=2, n_head=4, n_positions=256,
)


def build(out: Path, model_type: str, **overrides: Any) -> tuple[Path, Any]:
    """A tiny checkpoint of `model_type` as transformers writes it, and the reference model."""
    tokenizer = tc.build_tokenizer(out)
    config = transformers.CONFIG_MAPPING[model_type]()
    for key, value in {**SMALL, "vocab_size": len(tokenizer), **overrides}.items():
        if hasattr(config, key) or key in overrides:
            setattr(config, key, value)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    tc.spread_weights(model, spread=0.1)
    model.eval()
    model.save_pretrained(out)
    return out, model


def assert_matches_transformers(path: Path, reference: Any) -> Any:
    kit = mlx_engine.load_model(path)
    assert not kit.native
    with torch.no_grad():
        expected = reference(torch.tensor([IDS])).logits[0].numpy()
    ours = np.array(kit.model(mx.array([IDS]))[0].astype(mx.float32))
    assert np.abs(ours - expected).max() < 1e-4
    return kit


def test_gpt_neox_with_exact_gelu_is_refused(tmp_path: Path) -> None:
    """GPTNeoXConfig's default hidden_act 'gelu' is the erf GELU; mlx-lm's GPT-NeoX computes the tanh one."""
    path, _ = build(tmp_path / "m", "gpt_neox", intermediate_size=256)
    assert tc.read_config(path)["hidden_act"] == "gelu"
    with pytest.raises(ModelLoadError, match=r"gpt_neox .*hidden_act = 'gelu'.*tanh-approximated GELU.*What to do: "):
        mlx_engine.load_model(path)


def test_gpt_neox_written_by_transformers_5_loads_and_matches(tmp_path: Path) -> None:
    """transformers 5 writes rope_theta and the rotary fraction inside rope_parameters, where mlx-lm's
    ModelArgs (rotary_emb_base, rotary_pct) would raise TypeError: they are lifted."""
    path, reference = build(tmp_path / "m", "gpt_neox", intermediate_size=256, hidden_act="gelu_new")
    config = tc.read_config(path)
    assert "rotary_pct" not in config and config["rope_parameters"]["partial_rotary_factor"] == 0.25
    kit = assert_matches_transformers(path, reference)
    assert kit.config["rotary_pct"] == 0.25 and kit.config["rotary_emb_base"] == config["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("model_type", ["stablelm", "phi"])
def test_partial_rotary_factor_inside_rope_parameters_is_honoured(tmp_path: Path, model_type: str) -> None:
    """StableLM would raise TypeError (partial_rotary_factor missing); Phi would rotate 0.4 of each head
    (mlx-lm's default) instead of transformers' 0.5."""
    path, reference = build(tmp_path / "m", model_type)
    assert "partial_rotary_factor" not in tc.read_config(path)
    assert_matches_transformers(path, reference)


def test_a_key_mlx_lm_needs_and_transformers_does_not_write_is_named(tmp_path: Path) -> None:
    """mlx-lm's EXAONE reads num_layers; transformers' config has num_hidden_layers: a ModelLoadError, not a TypeError."""
    path, _ = build(tmp_path / "m", "exaone")
    with pytest.raises(ModelLoadError, match=r"exaone .*has no num_layers"):
        mlx_engine.load_model(path)


def test_an_ignored_sliding_window_is_refused(tmp_path: Path) -> None:
    path, reference = build(tmp_path / "m", "starcoder2", hidden_act="gelu", sliding_window=4)
    with pytest.raises(ModelLoadError, match=r"sliding_window = 4\. mlx-lm's Starcoder2 attends over every earlier position"):
        mlx_engine.load_model(path)
    # Without the window the same architecture is computed exactly.
    path, reference = build(tmp_path / "plain", "starcoder2", hidden_act="gelu", sliding_window=None)
    assert_matches_transformers(path, reference)


def test_an_ignored_rope_type_is_refused(tmp_path: Path) -> None:
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    path, _ = build(tmp_path / "m", "mixtral", rope_parameters=scaled)
    with pytest.raises(ModelLoadError, match=r"rope_scaling = .*linear.*mlx-lm's Mixtral builds plain RoPE"):
        mlx_engine.load_model(path)


def test_a_tied_config_never_drops_a_stored_head_transformers_uses(tmp_path: Path) -> None:
    path, _ = build(tmp_path / "m", "mixtral", tie_word_embeddings=False)
    config = tc.read_config(path)
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="lm_head.weight differs from model.embed_tokens.weight"):
        mlx_engine.load_model(path)


def test_olmo_is_refused_not_a_process_exit(tmp_path: Path) -> None:
    """mlx-lm's olmo module calls sys.exit when ai2-olmo is missing; the loader must refuse before importing it."""
    path, _ = build(tmp_path / "m", "olmo")
    with pytest.raises(ModelLoadError, match="olmo .*ai2-olmo"):
        mlx_engine.load_model(path)


def test_keyword_called_blocks_are_hooked(tmp_path: Path) -> None:
    """mlx-lm's GPT-J calls block(inputs=h, ...): the residual captures still equal transformers' hidden states."""
    path, reference = build(tmp_path / "m", "gptj", n_inner=None, rotary_dim=8)
    kit = assert_matches_transformers(path, reference)
    cache = mlx_engine.run_with_cache(kit, IDS, [{"layer_name": i, "component": "residual"} for i in range(2)])
    with torch.no_grad():
        hidden = reference(torch.tensor([IDS]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(np.array(cache["layers.0.residual"]), hidden[1][0].numpy(), atol=1e-4, rtol=1e-4)


def test_an_attention_input_without_a_site_is_a_hook_spec_error(tmp_path: Path) -> None:
    """Olmo 3 (sandwich norms, no pre-attention norm) through mlx-lm: attention's input has no hook point,
    so asking for it is refused by name (it was a KeyError when the run armed its hooks)."""
    layer_types = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    path, reference = build(tmp_path / "m", "olmo3", num_hidden_layers=4, layer_types=layer_types, sliding_window=4)
    kit = assert_matches_transformers(path, reference)
    assert "layernorm" not in kit.arch_info.offered
    with pytest.raises(HookSpecError, match="'attention' has no input hook point"):
        kit.resolve_hooks([{"layer_name": 1, "component": "attention", "capture_input": True}])
    listing = mlx_engine.ActivationHookManager(kit).hook_points()
    assert listing["layers"][1]["components"]["attention"]["supports_input"] is False
    (resolved,) = kit.resolve_hooks([{"layer_name": 1, "component": "residual", "capture_input": True, "capture_output": False}])
    cache = mlx_engine.run_with_cache(kit, IDS, [resolved])
    with torch.no_grad():
        hidden = reference(torch.tensor([IDS]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(np.array(cache[resolved.hook_id]), hidden[1][0].numpy(), atol=1e-4, rtol=1e-4)
    # Every component it offers equals transformers'; its attention and mlp are the sublayer
    # outputs before the post-norms (a native sandwich-norm model's are after them).
    report = mlx_engine.verify(kit, tokens=2, reference=reference)
    assert report.passed, report.to_text()
    rows = {r.name: r for r in report.rows}
    assert "before its post-norm" in rows["layers.0.attention"].notes[0] and "final_norm" in rows


def test_verify_covers_a_fallback_model(tmp_path: Path) -> None:
    path, reference = build(tmp_path / "m", "phi")
    report = mlx_engine.verify(mlx_engine.load_model(path), tokens=2)
    assert report.passed, report.to_text()
    assert {r.component for r in report.rows} == {"embedding", "residual", "attention", "mlp", "layernorm"}


def test_the_rule_table_says_why_and_what_to_do() -> None:
    for model_type, checks in FALLBACK_RULES.items():
        assert checks, model_type
        for check in checks:
            assert check.feature and check.why.endswith(".") and check.remedy, (model_type, check)
    assert all(check.fields for check in GENERIC_CHECKS)
