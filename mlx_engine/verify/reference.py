"""The reference: the same checkpoint in transformers (float32, eager attention), every tensor recorded.

Module outputs and inputs are read through torch forward hooks; queries, keys, values,
scores, probabilities and per-head outputs through an attention function registered with
transformers' AttentionInterface (its documented extension point) that records what
transformers' own eager attention receives and returns. A checkpoint quantized for MLX
cannot be read by transformers, so its reference is built from the config and given
exactly the weights our model computes with, dequantized (`dequantize.py`).

Nothing is downloaded: the checkpoint is the folder the kit was loaded from.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from .dequantize import load_dequantized

if TYPE_CHECKING:
    from ..loading import ModelKit

ATTN_IMPLEMENTATION = "mlx_engine_recording"
ATTENTION_NAMES = ("self_attn", "attn", "attention")
PRE_NORM_NAMES = ("input_layernorm", "ln_1")
GATE_NAMES = ("gate_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h")
DOWN_NAMES = ("down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h")

_active: Optional["Recorder"] = None
_lock = threading.Lock()


def _recording_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention of the module's own modeling file, with its tensors recorded."""
    recorder = _active
    eager = importlib.import_module(type(module).__module__).eager_attention_forward
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    if recorder is not None and id(module) in recorder.layer_of:
        recorder.record_attention(module, query, key, value, attention_mask, out, weights, kwargs)
    return out, weights


AttentionInterface.register(ATTN_IMPLEMENTATION, _recording_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _child(module: Any, names: tuple[str, ...]) -> Optional[Any]:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, torch.nn.Module):
            return child
    return None


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach()[0].float().numpy()


class Recorder:
    """One transformers forward with every intermediate tensor recorded, keyed "{layer}.{site}"."""

    def __init__(self, model: Any) -> None:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)  # a model built elsewhere records too
        self.model = model
        self.t: dict[str, np.ndarray] = {}
        self.blocks = self._blocks()
        self.layer_of = {id(_child(b, ATTENTION_NAMES)): i for i, b in enumerate(self.blocks)}

    def _blocks(self) -> list[Any]:
        base = self.model.base_model
        for name in ("layers", "h", "blocks"):
            blocks = getattr(base, name, None)
            if isinstance(blocks, torch.nn.ModuleList):
                return list(blocks)
        raise ValueError(f"cannot find the blocks of transformers' {type(self.model).__name__}")

    def record_attention(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: Any, out: torch.Tensor, weights: torch.Tensor, kwargs: dict[str, Any]) -> None:
        i, store = self.layer_of[id(module)], self.t
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        store[f"{i}.query"], store[f"{i}.key"], store[f"{i}.value"] = _numpy(query), _numpy(key), _numpy(value)
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        if kwargs.get("softcap"):
            scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
        if mask is None:
            raise ValueError("the reference attention got no explicit mask; it cannot tell masked keys")
        store[f"{i}.attention_scores"] = _numpy(scores)
        store[f"{i}.allowed"] = (mask[:, :, :, : k.shape[-2]] == 0)[0].expand_as(scores[0]).numpy()
        store[f"{i}.attention_pattern"] = _numpy(weights)
        store[f"{i}.z"] = out[0].transpose(0, 1).detach().float().numpy()  # [H, T, D]

    def _hooks(self) -> list[Any]:
        store, handles = self.t, []

        def out_hook(key: str, pick: Callable[[Any], torch.Tensor] = _first) -> Callable[..., None]:
            def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
                store[key] = _numpy(pick(output))

            return hook

        def in_hook(key: str) -> Callable[..., None]:
            def hook(module: Any, args: Any, kwargs: Any) -> None:
                store[key] = _numpy(args[0] if args else kwargs["hidden_states"])

            return hook

        def add(module: Optional[Any], key: str, what: str = "out", pick: Callable[[Any], torch.Tensor] = _first) -> None:
            if module is None:
                return
            if what == "out":
                handles.append(module.register_forward_hook(out_hook(key, pick), with_kwargs=True))
            else:
                handles.append(module.register_forward_pre_hook(in_hook(key), with_kwargs=True))

        for i, block in enumerate(self.blocks):
            attn, mlp = _child(block, ATTENTION_NAMES), _child(block, ("mlp", "feed_forward"))
            sandwich = isinstance(getattr(block, "post_feedforward_layernorm", None), torch.nn.Module)
            add(block, f"{i}.residual")
            add(block, f"{i}.resid_pre", "in")
            add(_child(block, PRE_NORM_NAMES), f"{i}.layernorm")
            add(attn, f"{i}.attention_in", "in")
            add(mlp, f"{i}.mlp_in", "in")
            if sandwich:  # what is added to the residual stream is the post-norm's output
                add(attn, f"{i}.attention_pre_norm")
                add(mlp, f"{i}.mlp_pre_norm")
                add(block.post_attention_layernorm, f"{i}.attention")
                add(block.post_feedforward_layernorm, f"{i}.mlp")
            else:
                add(attn, f"{i}.attention")
                add(mlp, f"{i}.mlp")
            router = _child(mlp, ("router", "gate")) if hasattr(mlp, "experts") else None
            if router is not None:
                add(router, f"{i}.router", pick=lambda o: _first(o)[None])
            elif mlp is not None:
                fused = _child(mlp, ("gate_up_proj",))
                if fused is not None:  # Phi-3: the gate is the first half of the fused projection
                    add(fused, f"{i}.mlp_pre", pick=lambda o: o.chunk(2, dim=-1)[0])
                else:
                    add(_child(mlp, GATE_NAMES), f"{i}.mlp_pre")
                add(_child(mlp, DOWN_NAMES), f"{i}.mlp_post", "in")
        return handles

    def run(self, ids: list[int]) -> dict[str, np.ndarray]:
        """Record one forward over `ids`; resid_mid is the block output less what the MLP added."""
        global _active
        handles = self._hooks()
        with _lock:
            _active = self
            try:
                with torch.no_grad():
                    out = self.model(torch.tensor([ids]), output_hidden_states=True)
            finally:
                _active = None
                for h in handles:
                    h.remove()
        store = self.t
        for i in range(len(self.blocks)):
            if f"{i}.residual" in store and f"{i}.mlp" in store:
                store[f"{i}.resid_mid"] = store[f"{i}.residual"] - store[f"{i}.mlp"]
        store["embedding"] = out.hidden_states[0][0].float().numpy()
        store["final_norm"] = out.hidden_states[-1][0].float().numpy()
        store["logits"] = out.logits[0].float().numpy()
        return store


def load_reference(kit: "ModelKit") -> Any:
    """transformers' model for the kit's checkpoint folder, float32, recording attention.

    The folder's own config.json is used, never the kit's (which may carry config_overrides),
    so a model loaded wrong differs from its reference.
    """
    if kit.config.get("quantization"):
        return load_dequantized(kit, ATTN_IMPLEMENTATION)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        kit.path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION, local_files_only=True
    )
    model.eval()
    return model
