"""One forward pass over a prompt with every layer's attention pattern and residual stream.

    python examples/run_with_cache.py [MODEL]
"""

import sys

import numpy as np

import mlx_engine

kit = mlx_engine.load_model(sys.argv[1] if len(sys.argv) > 1 else "default")
text = "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n"
hooks = [{"layer_name": i, "component": c} for i in range(kit.arch_info.num_layers) for c in ("residual", "attention_pattern")]
cache = mlx_engine.run_with_cache(kit, text, hooks)

tokens = [kit.tokenizer.decode([t]) for t in cache.tokens]
print(f"{len(tokens)} tokens; logits {tuple(cache.logits.shape)}")
for i in range(kit.arch_info.num_layers):
    pattern = np.array(cache[f"layers.{i}.attention_pattern"])  # [heads, T, S]
    capture = cache.activations[f"layers.{i}.attention_pattern"]
    last = pattern[:, -1, :].mean(0)  # the last token's attention, averaged over heads
    top = np.argsort(-last)[:3]
    attended = ", ".join(f"{tokens[capture.key_positions[k]]!r} ({last[k]:.2f})" for k in top)
    norm = np.linalg.norm(np.array(cache[f"layers.{i}.residual"]), axis=-1).mean()
    print(f"layer {i}: mean residual norm {norm:6.2f}; last token attends to {attended}")
