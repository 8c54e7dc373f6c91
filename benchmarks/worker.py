"""One contender in its own process: load once, then time trials on command.

Each contender lives in its own process so that its peak resident memory is its own
and so that loading one framework cannot slow another. The driver sends one JSON
command per line on stdin; answers are single stdout lines starting with `@@ ` (any
other output, such as a library's log line, is ignored by the driver).

Contenders:
  ours            mlx_engine.create_generator, no hooks armed
  ours_residual   create_generator_with_activations, residual of every layer
  ours_all10      the ten components of every layer (embedding once)
  mlx_lm          mlx_lm.stream_generate on the same folder
  transformers    torch float32 `generate` with output_hidden_states (exported weights)
  server          mlx_engine.server on 127.0.0.1 (the driver streams from it)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

MARK = "@@ "


def memory_status() -> dict[str, int]:
    """This process's peak and current resident bytes (VmHWM survives no exec, unlike ru_maxrss)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out["peak_rss" if key == "VmHWM" else "rss"] = int(value.split()[0]) * 1024
    return out


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def hook_specs(contender: str, num_layers: int) -> list[dict[str, Any]]:
    if contender == "ours_residual":
        return [{"layer_name": i, "component": "residual"} for i in range(num_layers)]
    per_layer = ["residual", "attention", "mlp", "layernorm", "attention_scores", "attention_pattern",
                 "key", "query", "value"]
    specs: list[dict[str, Any]] = [{"layer_name": "embedding", "component": "embedding"}]
    specs += [{"layer_name": i, "component": c} for i in range(num_layers) for c in per_layer]
    return specs


def weight_bytes_per_token(kit: Any) -> int:
    """Bytes of weights a decode step reads: every parameter once, except the embedding
    table (one row, unless tied and so read whole as the LM head) and unchosen experts."""
    from mlx.utils import tree_flatten

    info = kit.arch_info
    tied = bool(kit.config.get("tie_word_embeddings", False))
    total = 0.0
    for name, array in tree_flatten(kit.model.parameters()):
        nbytes = array.nbytes
        if "embed_tokens" in name and not tied:
            nbytes = nbytes / array.shape[0]
        elif ".experts." in name and info.n_experts:
            nbytes = nbytes * (info.experts_per_token or 1) / info.n_experts
        total += nbytes
    return int(total)


def timed(stream: Any, prompt_len: int) -> dict[str, Any]:
    """Consume a token stream; first-token time gives prefill, the rest decode."""
    t0 = time.perf_counter()
    stamps, tokens = [], []
    for token in stream:
        stamps.append(time.perf_counter())
        tokens.append(int(token))
    ttft = stamps[0] - t0
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft": ttft, "prefill_tps": prompt_len / ttft, "decode_tps": decode, "n": len(tokens), "tokens": tokens}


class Contender:
    """Loads a model for one contender and runs trials."""

    def __init__(self, name: str, model: Path) -> None:
        self.name = name
        t = time.perf_counter()
        self.trial: Callable[[list[int], int], dict[str, Any]]
        self.info: dict[str, Any] = {}
        if name == "transformers":
            self._load_transformers(model)
        elif name == "mlx_lm":
            self._load_mlx_lm(model)
        elif name == "server":
            self._load_server(model)
        else:
            self._load_ours(model)
        self.info["load_s"] = time.perf_counter() - t

    def _load_ours(self, model: Path) -> None:
        import mlx_engine

        kit = mlx_engine.load_model(model)
        # Random weights: no end-of-sequence, so every contender makes the same number of tokens.
        kit.tokenizer.eos_token_ids = []
        self.kit = kit
        specs = hook_specs(self.name, kit.arch_info.num_layers) if self.name != "ours" else None
        self.info["bytes_per_token"] = weight_bytes_per_token(kit)
        self.info["num_layers"] = kit.arch_info.num_layers

        def trial(prompt: list[int], max_tokens: int) -> dict[str, Any]:
            if specs is None:
                stream = (r.token for r in mlx_engine.create_generator(kit, prompt, max_tokens=max_tokens))
            else:
                stream = (
                    r.token
                    for r, _ in mlx_engine.create_generator_with_activations(kit, prompt, specs, max_tokens=max_tokens)
                )
            return timed(stream, len(prompt))

        self.trial = trial

    def _load_mlx_lm(self, model: Path) -> None:
        from mlx_lm import load, stream_generate

        m, tokenizer = load(str(model))
        tokenizer.eos_token_ids = []

        def trial(prompt: list[int], max_tokens: int) -> dict[str, Any]:
            return timed((r.token for r in stream_generate(m, tokenizer, prompt, max_tokens=max_tokens)), len(prompt))

        self.trial = trial

    def _load_transformers(self, model: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        m.eval()
        self.info["torch_threads"] = torch.get_num_threads()

        class Stamp(LogitsProcessor):
            """Called once per new token, right after that step's forward pass."""

            def __init__(self) -> None:
                self.stamps: list[float] = []

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                self.stamps.append(time.perf_counter())
                return scores

        def trial(prompt: list[int], max_tokens: int) -> dict[str, Any]:
            stamp = Stamp()
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = m.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens,
                    do_sample=False,
                    output_hidden_states=True,
                    return_dict_in_generate=True,
                    logits_processor=LogitsProcessorList([stamp]),
                    pad_token_id=0,
                )
            s = stamp.stamps
            ttft = s[0] - t0
            tokens = out.sequences[0, len(prompt):].tolist()
            decode = (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 else 0.0
            return {"ttft": ttft, "prefill_tps": len(prompt) / ttft, "decode_tps": decode, "n": len(tokens), "tokens": tokens}

        self.trial = trial

    def _load_server(self, model: Path) -> None:
        import threading

        from mlx_engine.server import ServerConfig, create_app, make_server

        config = ServerConfig(model=str(model), host="127.0.0.1", port=0, max_tokens_limit=100000)
        server = make_server(create_app(config), config)
        self.info["port"] = server.effective_port
        threading.Thread(target=server.run, daemon=True).start()

        def trial(prompt: list[int], max_tokens: int) -> dict[str, Any]:
            raise RuntimeError("the driver streams from the server itself")

        self.trial = trial

    def wire(self, prompt: list[int], steps: int) -> dict[str, Any]:
        from .wire import measure_wire_formats

        return measure_wire_formats(self.kit, prompt, steps)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--contender", required=True)
    parser.add_argument("--model", required=True, type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    contender = Contender(args.contender, args.model)
    reply({"ready": True, "pid": os.getpid(), **contender.info, **memory_status()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "trial":
                reply(contender.trial(cmd["prompt"], cmd["max_tokens"]))
            elif op == "wire":
                reply(contender.wire(cmd["prompt"], cmd["steps"]))
            elif op == "stats":
                reply(memory_status())
            elif op == "quit":
                reply({"bye": True})
                return 0
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as exc:  # the driver records the failure and goes on with the others
            reply({"error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
