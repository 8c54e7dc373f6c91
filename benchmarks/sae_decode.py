"""Decode speed with an SAE's top-k features streamed at every step, against hooks off, in one process.

    python -m benchmarks.sae_decode SPEC.json       (prints one `@@ {json}` line)

One TopK SAE (d_sae = `width` x d_model, random weights: speed does not depend on their values)
is attached at one layer's residual with `top_k = k`, so each step's capture is the k largest
features of the new position (ids and values). Rounds alternate, in the same process on the
same loaded model: hooks off (`create_generator`, no SAE attached), then the SAE attached and
its `sae_features` captured (`create_generator_with_activations`), then detached again. Each
round is the same prompt and max tokens, greedy, with no end-of-sequence token (random weights),
and every step's capture is turned into numpy inside the timed loop, as a client reading the
stream would. Alternating in one process keeps the ratio fair when other work shares the CPU;
one warm-up round of each mode comes first. Decode tok/s = (tokens - 1) / (last token time -
first token time), as benchmarks/worker.py's `timed` measures it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .worker import memory_status, timed

MARK = "@@ "


def random_topk_sae(d_model: int, d_sae: int, k: int, layer: int, seed: int) -> Any:
    """A TopK SAE of SAELens's layout: unit decoder rows in random directions, the encoder their transpose."""
    from mlx_engine.sae import SAE, SAEConfig

    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((d_sae, d_model)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    weights = {"W_enc": np.ascontiguousarray(w_dec.T), "W_dec": w_dec, "b_enc": np.zeros(d_sae, np.float32),
               "b_dec": np.zeros(d_model, np.float32)}
    return SAE(SAEConfig("topk", d_in=d_model, d_sae=d_sae, k=k, hook_name=f"blocks.{layer}.hook_resid_post"), weights)


def _stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model, then alternate hooks-off and SAE-streaming rounds (module docstring)."""
    import mlx_engine

    kit = mlx_engine.load_model(spec["model"])
    kit.tokenizer.eos_token_ids = []
    d_model = int(kit.config["hidden_size"])
    d_sae = spec["width"] * d_model
    sae = random_topk_sae(d_model, d_sae, spec["k"], spec["layer"], spec["seed"])
    vocab = int(kit.config["vocab_size"])
    prompt = [int(t) for t in np.random.default_rng(spec["seed"]).integers(3, vocab, size=spec["prompt_tokens"])]
    max_tokens = spec["decode_tokens"]
    captured: list[int] = []

    def off() -> dict[str, Any]:
        return timed((r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=max_tokens)), len(prompt))

    def streamed() -> dict[str, Any]:
        handle = mlx_engine.attach_sae(kit, sae, top_k=spec["k"])
        try:
            def tokens() -> Iterator[int]:
                for result, acts in mlx_engine.create_generator_with_activations(kit, prompt, [handle.hook_id], max_tokens=max_tokens):
                    for capture in acts[handle.hook_id]:
                        ids, values = np.array(capture.array), np.array(capture.extras["values"])
                        captured.append(int(ids.shape[-1] == spec["k"] and values.shape == ids.shape))
                    yield result.token
            return timed(tokens(), len(prompt))
        finally:
            handle.detach()

    modes: dict[str, Callable[[], dict[str, Any]]] = {"hooks_off": off, "sae_features": streamed}
    for run in modes.values():
        run()  # warm-up
    captured.clear()
    trials: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for _ in range(spec["rounds"]):
        for name, run in modes.items():
            trials[name].append(run())
    out: dict[str, Any] = {"model": spec["model_label"], "d_model": d_model, "d_sae": d_sae, "k": spec["k"],
                           "layer": spec["layer"], "hook_id": f"layers.{spec['layer']}.residual.sae_features",
                           "prompt_tokens": len(prompt), "decode_tokens": max_tokens, "rounds": spec["rounds"]}
    for name, rows in trials.items():
        out[name] = {"decode_tps": _stats([t["decode_tps"] for t in rows]), "ttft_s": _stats([t["ttft"] for t in rows])}
    first = trials["hooks_off"][0]["tokens"]
    out["same_tokens"] = all(t["tokens"] == first for rows in trials.values() for t in rows)
    out["captures"] = len(captured)
    out["captures_well_formed"] = bool(captured) and all(captured)
    out["peak_rss_bytes"] = memory_status()["peak_rss"]
    return out


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    started = time.perf_counter()
    result = measure(spec)
    result["seconds"] = time.perf_counter() - started
    print(MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
