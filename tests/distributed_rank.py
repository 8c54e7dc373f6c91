"""One rank of a tensor-parallel test job, and the scenarios it shares with the single-process run.

Run as a script by tests/test_distributed_tensor.py, once per rank, with MLX_RANK and
MLX_HOSTFILE set (ring backend over 127.0.0.1):

    python tests/distributed_rank.py CHECKPOINT|JOBS.json OUT_DIR [tensor|pipeline]

It loads CHECKPOINT with `parallel=` the mode (tensor unless given), runs `scenarios`, and
writes OUT_DIR/rank{r}.npz (tests/test_distributed_pipeline.py runs it with "pipeline").
Given a JSON file of {name: checkpoint} instead, one job runs every checkpoint in turn and
writes OUT_DIR/name/rank{r}.npz: the ranks start (and import MLX, transformers, torch) once
for the whole matrix instead of once per checkpoint.
The parent test runs the same `scenarios` on an ordinary load and compares the files.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Over 32 tokens: gpt-oss's experts then take their expert-sorted path (B*T*k >= 64), and the
# prompt plus the decode steps run past the 8-position sliding windows of the tiny checkpoints.
PROMPT = (
    "def encode(obj, indent=None, separators=None):\n"
    "    if isinstance(obj, dict):\n        return json.dumps(obj, indent=indent, separators=separators)\n"
)
STEPS = 8


def all_hooks(kit: Any) -> list[dict[str, Any]]:
    """Every component the listing offers at every layer (inputs too), the embedding and the final norm."""
    from mlx_engine.hooks.listing import describe_hook_points

    listing = describe_hook_points(kit)
    hooks: list[dict[str, Any]] = [{"layer_name": "embedding"}, {"layer_name": "final_norm"}]
    for layer in listing["layers"]:
        for component, entry in layer["components"].items():
            spec = {"layer_name": layer["layer"], "component": component, "capture_input": entry["supports_input"], "capture_output": True}
            # qwen3_moe lists expert sites for every layer; its dense blocks have none.
            if all(r.site in kit.hook_points for r in kit.resolve_hooks([spec])):
                hooks.append(spec)
    return hooks


def record_steps(out: dict[str, Any], prefix: str, steps: Iterable[Any]) -> None:
    """Tokens, logprobs and every capture of a generation, under `prefix`."""
    tokens, logprobs, top = [], [], []
    for result, activations in steps:
        tokens.append(result.token)
        logprobs.append(result.logprob)
        top.append([lp.logprob for lp in result.top_logprobs])
        for hook_id, captures in activations.items():
            for i, c in enumerate(captures):
                key = f"{prefix}/capture/{hook_id}/step{c.step}/{i}"
                out[f"{key}/meta"] = np.array(json.dumps(c.metadata(), sort_keys=True))
                for name, (array, _) in c.wire_arrays().items():
                    out[f"{key}/{name}"] = array
    out[f"{prefix}/tokens"] = np.array(tokens)
    out[f"{prefix}/logprobs"] = np.array(logprobs, dtype=np.float64)
    out[f"{prefix}/top_logprobs"] = np.array(top, dtype=np.float64)


HEAD_LAYER = 1  # head and residual edits: early, so every later layer sees them


def unit_layer(kit: Any) -> int:
    """Unit edits at the last layer: a sparse block in every MoE checkpoint of the tests."""
    return kit.arch_info.num_layers - 1


def interventions(kit: Any, prompt_len: int) -> dict[str, list[dict[str, Any]]]:
    """Edits at sharded sites (heads and units, local and gathered) and on the residual stream."""
    info = kit.arch_info
    units_at = unit_layer(kit)
    rng = np.random.default_rng(0)
    units = "expert_post" if info.n_experts else "mlp_post"
    last = info.n_heads - 1
    return {
        "z_ablate_first": [{"layer_name": HEAD_LAYER, "component": "z", "op": "zero", "heads": [0]}],
        "z_ablate_last": [{"layer_name": HEAD_LAYER, "component": "z", "op": "zero", "heads": [last]}],
        "residual_steer": [
            {"layer_name": HEAD_LAYER, "component": "residual", "op": "add", "scale": 4.0,
             "vector": rng.normal(size=info.d_model).astype(np.float32).tolist()}
        ],
        "query_scale": [{"layer_name": HEAD_LAYER, "component": "query", "op": "scale", "scale": 0.25, "heads": [last]}],
        "value_mean": [
            {"layer_name": HEAD_LAYER, "component": "value", "op": "mean",
             "values": rng.normal(size=(info.n_kv_heads, info.head_dim)).astype(np.float32).tolist()}
        ],
        "z_patch": [
            {"layer_name": HEAD_LAYER, "component": "z", "op": "patch", "positions": "prompt", "heads": [last],
             "values": rng.normal(size=(info.n_heads, prompt_len, info.head_dim)).astype(np.float32).tolist()}
        ],
        "units_zero": [{"layer_name": units_at, "component": units, "op": "zero", "indices": [0, 5, info.d_mlp - 1]}],
        "units_add": [
            {"layer_name": units_at, "component": units, "op": "add", "scale": 2.0,
             "vector": rng.normal(size=info.d_mlp).astype(np.float32).tolist()}
        ],
        "units_topk": [{"layer_name": units_at, "component": units, "op": "topk", "k": 7}],
    }


def scenarios(kit: Any) -> dict[str, Any]:
    """Everything compared: greedy generation with every hook, prompt logits, and each edit."""
    import mlx_engine

    out: dict[str, Any] = {}
    tokens = mlx_engine.tokenize(kit, PROMPT)
    gen: dict[str, Any] = {"max_tokens": STEPS, "temp": 0.0, "top_logprobs": 5}
    record_steps(out, "all_hooks", mlx_engine.create_generator_with_activations(kit, tokens, all_hooks(kit), **gen))
    generated = [int(t) for t in out["all_hooks/tokens"]]
    cache = mlx_engine.run_with_cache(kit, tokens + generated, prefill_step_size=7)
    out["logits"] = np.asarray(cache.logits)
    info = kit.arch_info
    units = "expert_post" if info.n_experts else "mlp_post"
    watch = [
        {"layer_name": info.num_layers - 1, "component": "residual", "hook_id": "out"},
        {"layer_name": HEAD_LAYER, "component": "z"},
        {"layer_name": unit_layer(kit), "component": units},
    ]
    for name, edits in interventions(kit, len(tokens)).items():
        steps = mlx_engine.create_generator_with_activations(kit, tokens, watch, interventions=edits, **gen)
        record_steps(out, f"edit/{name}", steps)
    return out


def main(argv: list[str]) -> int:
    target, out_dir = Path(argv[1]), Path(argv[2])
    parallel = argv[3] if len(argv) > 3 else "tensor"
    import mlx_engine  # noqa: F401  (before MLX: it binds MLX's CPU backend to OpenBLAS first)

    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    jobs = json.loads(target.read_text()) if target.suffix == ".json" else {"": str(target)}
    for name, checkpoint in jobs.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        run_checkpoint(Path(checkpoint), folder, parallel, group)
        gc.collect()
        mx.clear_cache()
    return 0


def run_checkpoint(checkpoint: Path, out_dir: Path, parallel: str, group: Any) -> None:
    """Load one checkpoint split over the job's ranks, run the scenarios, write this rank's file."""
    import mlx_engine

    kit = mlx_engine.load_model(checkpoint, parallel=parallel)
    out = scenarios(kit)
    out["world"] = np.array([group.rank(), group.size()])
    if parallel == "pipeline":
        from mlx.utils import tree_flatten

        from mlx_engine.distributed.pipeline import AbsentBlock

        # Which blocks this rank holds (1) and which it left to another rank (0).
        out["held_blocks"] = np.array([not isinstance(b, AbsentBlock) for b in kit.model.layers])
        out["parameters"] = np.array(sorted(k for k, _ in tree_flatten(kit.model.parameters())))
        np.savez(out_dir / f"rank{group.rank()}.npz", **out)
        return
    from mlx_engine.distributed import adapter_for

    layout = adapter_for(kit.arch_info.model_type)
    attn = getattr(kit.model.layers[0], layout.attn)
    # What this rank holds: its heads, and the classes of the split layers (not compared).
    out["local_heads"] = np.array([getattr(attn, layout.heads[0]), getattr(attn, layout.heads[-1])])
    out["layer_classes"] = np.array(json.dumps(sorted({type(m).__name__ for _, m in kit.model.named_modules()})))
    np.savez(out_dir / f"rank{group.rank()}.npz", **out)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
