"""The NeuroScope bridge end to end: capture over REST, convert to NeuroScope's format, write files.

    mlx-engine serve --model default                # in another terminal
    python examples/neuroscope_bridge.py [--base-url http://127.0.0.1:8080] [--out DIR] [--dialect pharo]
                                         [--layers N] [--prompt TEXT] [--max-tokens N]

Steps: check the server, load the model, read its hook points, build the preset hook
sets from that listing (so a hook the model lacks is refused here, not mid-generation),
let the server resolve them, run one whole and one streamed generation with base64
captures, convert both to NeuroScope's activation format and write them as JSON, and
write the Smalltalk client a NeuroScope image files in to talk to the same server.

Files written to --out: circuit.json (embedding + residual/attention/mlp of the first
--layers layers, all by default; whole response), attention_stream.json (attention of the last layer, streamed),
and NeuroScopeClient-<dialect>.st.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
from pathlib import Path
from typing import Any, Optional

import numpy as np

from mlx_engine.integrations.neuroscope.client import NeuroScopeClient, NeuroScopeError
from mlx_engine.integrations.neuroscope.format import convert_activations_for_neuroscope
from mlx_engine.integrations.neuroscope.presets import (
    create_attention_analysis_hooks,
    create_hook_specs_for_circuit_analysis,
)
from mlx_engine.integrations.neuroscope.smalltalk import DIALECTS, generate_smalltalk_client

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_PROMPT = "Write a function that returns the sum of a list."


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, allow_nan=False), encoding="utf-8")
    hooks = document["activations"]
    values = sum(len(e["data"] or []) for entries in hooks.values() for e in entries)
    print(f"wrote {path}: {len(hooks)} hooks, {values} values, {len(document['generated_tokens'])} generated tokens")


def describe(document: dict[str, Any], hook_id: str) -> None:
    """One line per step of `hook_id`: shape and mean absolute value, read back from the converted data."""
    for entry in document["activations"][hook_id]:
        data = np.array(entry["data"], dtype=np.float64)
        print(f"  {hook_id} step {entry['step']} positions {entry['positions']} shape {entry['shape']} mean|x| {np.abs(data).mean():.4f}")


def run(base_url: str, out: Path, model: str, dialect: str, max_tokens: int, layers: Optional[int], prompt: str) -> int:
    client = NeuroScopeClient(base_url)
    print(f"health: {client.health()['status']}")
    described = client.load_model(model)
    print(f"model: {described['id']}")
    points = client.hook_points()
    print(f"hook points: {points['num_layers']} layers, d_model {points['d_model']}, components {', '.join(points['components'])}")

    circuit = create_hook_specs_for_circuit_analysis(num_layers=layers, hook_points=points)
    last = points["num_layers"] - 1
    attention = create_attention_analysis_hooks([last], hook_points=points, components=("attention_pattern", "query"))
    resolved = client.register_hooks(circuit + attention)  # the server resolves (and validates) every name
    print(f"preset hooks resolved by the server: {', '.join(h['hook_id'] for h in resolved)}")
    client.clear_hooks()  # the hooks travel with each request below; nothing stays registered

    out.mkdir(parents=True, exist_ok=True)
    whole = client.generate_with_activations(prompt, circuit, max_tokens=max_tokens, temperature=0.0)
    print(f"whole generation: {whole.tokens}")
    document = convert_activations_for_neuroscope(whole)
    write_json(out / "circuit.json", document)
    residual_ids = [hook_id for hook_id in document["activations"] if hook_id.endswith(".residual")]
    if residual_ids:
        describe(document, residual_ids[-1])

    stream = client.generate_with_activations(prompt, attention, stream=True, max_tokens=max_tokens, temperature=0.0)
    pattern_id = f"layers.{last}.attention_pattern"
    for chunk in stream:
        for capture in chunk.captures.get(pattern_id, []):
            heads_mean = capture.array.mean(axis=0)[-1]  # [S]: the newest row, averaged over heads
            top = int(np.argmax(heads_mean))
            print(
                f"  streamed step {capture.step} token {chunk.token_text!r}: attends most to key position "
                f"{capture.key_positions[top]} ({heads_mean[top]:.3f})"
            )
    document = convert_activations_for_neuroscope(stream.response())
    write_json(out / "attention_stream.json", document)

    source = generate_smalltalk_client(dialect, base_url)
    st_file = out / f"NeuroScopeClient-{dialect}.st"
    st_file.write_text(source, encoding="utf-8")
    print(f"wrote {st_file}: {dialect} client, {len(source)} characters")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the server's root URL (default {DEFAULT_BASE_URL})")
    parser.add_argument("--out", type=Path, default=Path("neuroscope_out"), help="folder for the JSON and Smalltalk files")
    parser.add_argument("--model", default="default", help="model the server should load (default: the embedded one)")
    parser.add_argument("--dialect", choices=DIALECTS, default="pharo", help="Smalltalk dialect of the client file")
    parser.add_argument("--layers", type=int, default=None, help="circuit hooks for the first N layers (default: all)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=6)
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    try:
        return run(base_url, args.out, args.model, args.dialect, args.max_tokens, args.layers, args.prompt)
    except urllib.error.URLError as exc:
        print(
            f"No mlx-engine server answers at {base_url} ({exc.reason}). Start one with\n"
            f"    mlx-engine serve --model default --port 8080",
            file=sys.stderr,
        )
        return 2
    except NeuroScopeError as exc:
        print(f"the server refused a request: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
