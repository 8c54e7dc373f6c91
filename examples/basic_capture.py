"""Stream a generation and print each token with the norm of its residual stream per layer.

    python examples/basic_capture.py [MODEL]      # MODEL defaults to the embedded "default"
"""

import sys

import mlx.core as mx

import mlx_engine

kit = mlx_engine.load_model(sys.argv[1] if len(sys.argv) > 1 else "default")
layers = range(kit.arch_info.num_layers)
hooks = [{"layer_name": i, "component": "residual"} for i in layers]
prompt = mlx_engine.chat_tokens(kit, [{"role": "user", "content": "Write a Python function."}])

# One row per generated token: its text, then the L2 norm of the residual stream after each layer.
print(f"{'token':>14}  " + " ".join(f"{f'layer {i}':>7}" for i in layers))
for result, acts in mlx_engine.create_generator_with_activations(kit, prompt, hooks, max_tokens=16):
    # The captures handed out with a token are those of the pass that chose it: its last row.
    norms = [mx.linalg.norm(acts[f"layers.{i}.residual"][-1].array[-1]).item() for i in layers]
    print(f"{result.text!r:>14}  " + " ".join(f"{n:7.2f}" for n in norms))
