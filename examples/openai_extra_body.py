"""Activations through the official `openai` client: hooks ride in `extra_body`.

    mlx-engine serve --model default                # in another terminal
    python examples/openai_extra_body.py [--base-url http://127.0.0.1:8080] [--layer N]

The server's /v1/chat/completions accepts `activation_hooks` and `activation_format`
beyond OpenAI's fields; the SDK sends them when given as `extra_body`. What the server
adds to its answer (`activations`, `token_text`, `generated_tokens_text`, ...) lands in
the SDK objects' `model_extra`, since OpenAI's response models keep unknown fields.
The example runs the same greedy chat twice, whole and streamed, and prints the norm
of the newest residual row of one layer per step: the two columns must agree.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
PROMPT = "Write a Python function that reverses a string."


def decode(capture: Mapping[str, Any]) -> np.ndarray:
    """A base64 wire capture as a float32 array of its shape (little-endian bytes on the wire)."""
    raw = base64.b64decode(capture["data"])
    if capture["dtype"] == "bfloat16":
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=np.dtype(capture["dtype"]).newbyteorder("<")).astype(np.float32)
    return values.reshape(capture["shape"])


def whole(client: openai.OpenAI, model: str, hooks: list[dict[str, Any]], max_tokens: int) -> list[tuple[int, str, float]]:
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"activation_hooks": hooks, "activation_format": "base64"},
    )
    extra = completion.model_extra or {}
    tokens = extra["generated_tokens_text"]
    print(f"whole: finish_reason={completion.choices[0].finish_reason}, usage={completion.usage.completion_tokens} tokens, capture_id={extra['capture_id']}")
    print(f"whole: text={completion.choices[0].message.content!r}")
    rows = []
    for hook_id, captures in extra["activations"].items():
        for capture in captures:  # step order; step k's pass chose generated token k
            array = decode(capture)
            rows.append((capture["step"], tokens[capture["step"]], float(np.linalg.norm(array[-1]))))
            print(f"whole  step {capture['step']:>2} {tokens[capture['step']]!r:>16} {hook_id} shape {capture['shape']} |last row| {rows[-1][2]:.4f}")
    return rows


def streamed(client: openai.OpenAI, model: str, hooks: list[dict[str, Any]], max_tokens: int) -> list[tuple[int, str, float]]:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"activation_hooks": hooks, "activation_format": "base64"},
    )
    rows = []
    text = []
    for chunk in stream:
        extra = chunk.model_extra or {}
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        for hook_id, captures in (extra.get("activations") or {}).items():
            for capture in captures:
                array = decode(capture)
                rows.append((capture["step"], extra["token_text"], float(np.linalg.norm(array[-1]))))
                print(f"stream step {capture['step']:>2} {extra['token_text']!r:>16} {hook_id} shape {capture['shape']} |last row| {rows[-1][2]:.4f}")
        if chunk.choices and chunk.choices[0].finish_reason:
            print(f"stream: finish_reason={chunk.choices[0].finish_reason}")
    print(f"stream: text={''.join(text)!r}")
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the server's root URL (default {DEFAULT_BASE_URL})")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--layer", type=int, default=-1, help="layer whose residual stream is captured (default: the last)")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    base_url = args.base_url.rstrip("/")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=args.api_key, max_retries=0, timeout=300)
    try:
        model = client.models.list().data[0]
    except openai.APIConnectionError:
        print(f"No mlx-engine server answers at {base_url}. Start one with\n    mlx-engine serve --model default --port 8080", file=sys.stderr)
        return 2
    num_layers = (model.model_extra or {}).get("num_layers")
    layer = args.layer if args.layer >= 0 or num_layers is None else num_layers + args.layer
    hooks = [{"layer_name": layer, "component": "residual"}]
    print(f"model {model.id}: residual stream of layer {layer}")
    a = whole(client, model.id, hooks, args.max_tokens)
    b = streamed(client, model.id, hooks, args.max_tokens)
    same = len(a) == len(b) and all(x[:2] == y[:2] and abs(x[2] - y[2]) <= 1e-4 * max(1.0, x[2]) for x, y in zip(a, b))
    print(f"whole and streamed captures agree: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
